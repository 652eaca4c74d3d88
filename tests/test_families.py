"""Reference-exact inputs per family, without weights.

The reference pipelines are built offline from the published settings (docs/models.md,
"Reference inputs per family"): the checkpoints' image processor configs and tokenizers,
plus the published steps outside them (MedSigLIP's tf.image.resize, SigLIP 2's lower case,
SigLIP's 64-token padding). medsig's pixels must match within 1e-5, token ids exactly.
"""

from __future__ import annotations

import io
import string

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from medsig.data.images import load_image
from medsig.data.transforms import Preprocess, tf_bilinear_resize
from medsig.models.encoder import Encoder
from medsig.models.families import detect_family, family_preprocess, read_record, write_record

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXTS = ["A Photo of an ARM, with NO rash!",
         "Chest X-ray: LEFT lower-lobe consolidation; (effusion?)",
         " ".join(["Erythema, oedema & PURULENT exudate at the incision site."] * 12), "a"]


def _siglip_processor(size: int, resample: int):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # google/siglip-base-patch16-224 preprocessor_config.json: resample 3, size 224, 0.5 / 0.5
    return SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   rescale_factor=1 / 255)


def _clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # openai/clip-vit-base-patch32 preprocessor_config.json
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224,
                                 "width": 224}, do_center_crop=True, resample=3,
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """square, wide, tall, grayscale, 16-bit and EXIF-rotated files + reference decodes."""
    root = tmp_path_factory.mktemp("family_images")
    rng = np.random.default_rng(0)
    out = {}

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    for name, img in (("square", rgb(300, 300)), ("wide", rgb(123, 517)),
                      ("tall", rgb(517, 123)),
                      ("gray", Image.fromarray(rng.integers(0, 256, (211, 97), dtype=np.uint8)))):
        img.save(root / f"{name}.png")
        out[name] = (root / f"{name}.png", img.convert("RGB"))
    deep = rng.integers(1000, 60000, (150, 240)).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep.png")
    lo, hi = float(deep.min()), float(deep.max())  # the documented 16-bit window: min..max
    eight = ((deep - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8)
    out["deep"] = (root / "deep.png", Image.fromarray(eight).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rgb(90, 200).save(root / "exif.jpg", exif=exif, quality=95)
    with Image.open(root / "exif.jpg") as raw:
        out["exif"] = (root / "exif.jpg", ImageOps.exif_transpose(raw).convert("RGB"))
    return out


def _check(pre: Preprocess, reference, images) -> None:
    for name, (path, decoded) in images.items():
        ours = pre(load_image(path))
        ref = reference(decoded)
        assert ours.shape == ref.shape, name
        assert torch.max(torch.abs(ours - ref)).item() < 1e-5, name


def _hf(processor):
    return lambda img: torch.as_tensor(
        processor(images=img, return_tensors="np")["pixel_values"][0]).float()


@pytest.mark.parametrize("family,resample", [("siglip", 3), ("siglip2", 2)])
def test_siglip_pixels_equal_the_checkpoint_processor(images, family, resample):
    processor = _siglip_processor(224, resample)
    _check(family_preprocess(processor, family), _hf(processor), images)


def test_clip_pixels_equal_the_processor_shortest_edge_and_centre_crop(images):
    processor = _clip_processor()
    pre = family_preprocess(processor, "clip")
    assert pre.shortest_edge == 224 and pre.size == 224
    _check(pre, _hf(processor), images)


def test_medsiglip_pixels_equal_the_notebook_pipeline(images):
    """quick_start_with_hugging_face.ipynb: tf.image.resize(448, bilinear, no antialias)
    -> uint8 -> the checkpoint's processor (448, 0.5 / 0.5)."""
    processor = _siglip_processor(448, 2)
    hf = _hf(processor)
    _check(family_preprocess(processor, "medsiglip"), lambda img: hf(Image.fromarray(
        tf_bilinear_resize(np.asarray(img), (448, 448)))), images)


def _tf_resize_loop(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow's half-pixel bilinear written pixel by pixel (float32, lerp order)."""
    f32 = np.float32
    h, w = src.shape[:2]
    sy, sx = f32(h) / f32(out_h), f32(w) / f32(out_w)
    out = np.zeros((out_h, out_w, src.shape[2]), np.float32)
    for y in range(out_h):
        fy = (f32(y) + f32(0.5)) * sy - f32(0.5)
        y0, y1, ly = max(int(np.floor(fy)), 0), min(int(np.ceil(fy)), h - 1), fy - np.floor(fy)
        for x in range(out_w):
            fx = (f32(x) + f32(0.5)) * sx - f32(0.5)
            x0, x1 = max(int(np.floor(fx)), 0), min(int(np.ceil(fx)), w - 1)
            lx = fx - np.floor(fx)
            a, b = src[y0, x0].astype(f32), src[y0, x1].astype(f32)
            c, d = src[y1, x0].astype(f32), src[y1, x1].astype(f32)
            top, bottom = a + (b - a) * lx, c + (d - c) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("shape,size", [((23, 31), (17, 13)), ((9, 14), (40, 33))])
def test_tf_bilinear_matches_the_formula_and_torch_half_pixel(shape, size):
    src = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    ours = tf_bilinear_resize(src, size)
    assert np.array_equal(ours, _tf_resize_loop(src, *size).astype(np.uint8))
    t = torch.from_numpy(src).permute(2, 0, 1)[None].float()
    torch_out = torch.nn.functional.interpolate(t, size=size, mode="bilinear",
                                                align_corners=False, antialias=False)
    diff = np.abs(torch_out[0].permute(1, 2, 0).numpy() - ours.astype(np.float32))
    assert diff.max() < 1.0 + 1e-3  # same sample points; ours is truncated to uint8


def test_pad_option_differs_and_is_recorded(tmp_path, images):
    processor = _siglip_processor(224, 3)
    pad = family_preprocess(processor, "siglip", "pad")
    wide = load_image(images["wide"][0])
    assert pad(wide)[:, :40].max() == pad(wide)[:, :40].min()  # zero band above the image
    processor.save_pretrained(tmp_path)
    write_record(tmp_path, "medsiglip", pad)
    record = read_record(tmp_path)
    assert record["family"] == "medsiglip" and record["mode"] == "pad"
    assert record["text"]["text_length"] == 64
    from transformers import AutoImageProcessor

    AutoImageProcessor.from_pretrained(tmp_path)  # the extra key does not break transformers


# -- text -------------------------------------------------------------------------------
def _encoder(tokenizer, family: str, kind: str = "siglip", positions: int = 64) -> Encoder:
    return Encoder(None, _siglip_processor(224, 3), tokenizer, kind, family, torch.device("cpu"),
                   None, positions, family)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm

    words = " ".join(TEXTS).lower().translate(str.maketrans("", "", string.punctuation)).split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_writer=model,
                                   vocab_size=80, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def _gemma_vocab():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    merges = [("▁", "a"), ("▁", "p"), ("h", "o"), ("ho", "t"), ("o", "n"), ("▁", "A")]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + chars + ["".join(m) for m in merges]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def test_siglip_text_is_padded_to_64_with_the_checkpoint_tokenizer(sentencepiece_model):
    from transformers import SiglipTokenizer

    tok = SiglipTokenizer(str(sentencepiece_model), model_max_length=64)
    ref = tok(TEXTS, padding="max_length", max_length=64, truncation=True)["input_ids"]
    ours = _encoder(tok, "siglip").tokenize(TEXTS)["input_ids"]
    assert ours.shape == (len(TEXTS), 64)
    assert ours.tolist() == ref
    assert len(tok(TEXTS[2])["input_ids"]) > 64  # the long text really is truncated


def test_siglip2_text_is_lower_cased_like_training(sentencepiece_model):
    """Published SigLIP 2 checkpoints load a GemmaTokenizer that keeps case; the model was
    trained on lower-cased text (Siglip2Tokenizer enforces it): medsig equals the latter."""
    from transformers import GemmaTokenizer
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    vocab, merges = _gemma_vocab()
    published = GemmaTokenizer(vocab=dict(vocab), merges=list(merges))
    trained = Siglip2Tokenizer(vocab=dict(vocab), merges=list(merges))
    kwargs = dict(padding="max_length", max_length=64, truncation=True, padding_side="right")
    ref = trained(TEXTS, **kwargs)["input_ids"]
    assert published(TEXTS, **kwargs)["input_ids"] != ref  # case matters for these texts
    ours = _encoder(published, "siglip2").tokenize(TEXTS)["input_ids"]
    assert ours.tolist() == ref


def test_clip_text_pads_to_the_longest_and_keeps_the_mask():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    ref = tok(TEXTS, padding=True, truncation=True, max_length=77)
    ours = _encoder(tok, "clip", kind="clip", positions=77).tokenize(TEXTS)
    assert ours["input_ids"].tolist() == ref["input_ids"]
    assert ours["attention_mask"].tolist() == ref["attention_mask"]
    assert ours["input_ids"].shape[1] == 77


def test_detect_family_from_id_config_and_tokenizer():
    from transformers import CLIPConfig, SiglipConfig

    siglip = SiglipConfig()
    assert detect_family("google/siglip-base-patch16-224", siglip) == "siglip"
    assert detect_family("google/siglip2-base-patch16-224", siglip) == "siglip2"
    assert detect_family("google/medsiglip-448", siglip) == "medsiglip"
    assert detect_family("/some/folder", SiglipConfig(text_config={"vocab_size": 256000})) \
        == "siglip2"
    assert detect_family("openai/clip-vit-base-patch32", CLIPConfig()) == "clip"
    assert detect_family("facebook/dinov2-small", None, has_text=False) == "image"


def test_encoder_load_reads_the_recorded_family_and_mode(tmp_path):
    from medsig.models.tiny import write_tiny

    folder = write_tiny(tmp_path / "m", arch="siglip", image_size=32, patch_size=8,
                        hidden_size=32, layers=1, heads=2)
    enc = Encoder.load(folder, device="cpu")
    assert enc.family == "siglip" and enc.preprocess.mode == "reference"
    write_record(folder, "medsiglip", family_preprocess(enc.image_processor, "medsiglip", "pad"))
    again = Encoder.load(folder, device="cpu")
    assert again.family == "medsiglip" and again.preprocess.mode == "pad"
    assert Encoder.load(folder, device="cpu", preprocess="reference").preprocess.resize_method \
        == "tf_bilinear"


@pytest.mark.parametrize("mode", ["pad", "resize", "reference"])
def test_uint8_pixels_raise_no_warning(mode):
    """Pixels own their memory: no "non-writable NumPy array" warning in a user's log."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = Preprocess(64, mode=mode).to_uint8(Image.new("RGB", (100, 60)))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
