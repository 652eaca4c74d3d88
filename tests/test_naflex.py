"""SigLIP 2 NaFlex end to end, without weights.

The reference is transformers' ``Siglip2ImageProcessor`` (PIL backend) configured as
google/siglip2-base-patch16-naflex publishes it (patch 16, max_num_patches 256, bilinear,
mean = std = 0.5): medsig's patches within 1e-5, masks and grid shapes equal, on square,
wide, tall, grayscale, 16-bit and EXIF-rotated images; token ids equal to the lower-casing
Siglip2Tokenizer; embeddings equal to a plain transformers forward; training, the recorded
``max_num_patches`` and reloading in load_predictor, serve and plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medsig.data.images import load_image
from medsig.data.patches import Patches, stack_pixels
from medsig.models.naflex import FAMILY, NaflexPreprocess, target_size
from tests.test_families import TEXTS, _gemma_vocab, images  # noqa: F401 (fixture)

LIKE = "google/siglip2-base-patch16-naflex"
KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def _processor(max_num_patches: int = 256):
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    # google/siglip2-base-patch16-naflex preprocessor_config.json
    return Siglip2ImageProcessorPil(patch_size=16, max_num_patches=max_num_patches, resample=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    rescale_factor=1 / 255)


def _same(ours: Patches, ref: dict, name: str) -> None:
    assert ours.pixel_values.shape == ref["pixel_values"].shape, name
    assert torch.max(torch.abs(ours.pixel_values - ref["pixel_values"])).item() < 1e-5, name
    assert torch.equal(ours.pixel_attention_mask, ref["pixel_attention_mask"]), name
    assert torch.equal(ours.spatial_shapes, ref["spatial_shapes"]), name


@pytest.mark.parametrize("max_num_patches", [256, 64])
def test_patches_equal_the_checkpoint_processor(images, max_num_patches):  # noqa: F811
    processor = _processor(max_num_patches)
    pre = NaflexPreprocess.from_processor(processor)
    shapes = set()
    for name, (path, decoded) in images.items():
        ref = processor(images=decoded, return_tensors="pt")
        image = load_image(path)
        _same(stack_pixels([pre(image)]), ref, name)
        # the worker / device split: uint8 patches, normalised later (padding stays zero)
        _same(pre.normalize(stack_pixels([pre.to_uint8(image)])), ref, f"{name} uint8")
        shapes.add(tuple(ref["spatial_shapes"][0].tolist()))
        assert int(ref["pixel_attention_mask"].sum()) <= max_num_patches
    assert len(shapes) >= 4  # the aspect ratio is kept: wide, tall and square grids differ
    via = NaflexPreprocess.from_processor(processor, mode="processor")
    path, decoded = images["wide"]
    _same(stack_pixels([via(load_image(path))]), processor(images=decoded, return_tensors="pt"),
          "processor mode")


def test_patches_move_like_a_pixel_tensor():
    pre = NaflexPreprocess(patch_size=4, max_num_patches=10)
    batch = stack_pixels([pre(Image.new("RGB", (w, 8))) for w in (8, 20, 3)])
    assert len(batch) == 3 and batch.shape == (3, 10, 48)
    assert batch[None][0].spatial_shapes.tolist() == batch.spatial_shapes.tolist()
    assert len(batch[1:]) == 2 and batch.to(torch.float64).dtype == torch.float64
    assert batch.to(torch.float64).spatial_shapes.dtype == torch.int64
    grids = [[s // 4 for s in target_size(8, w, 4, 10)] for w in (8, 20, 3)]
    assert batch.spatial_shapes.tolist() == grids and grids[1] == [2, 5]  # 8 x 20: 2 x 5
    assert all(r * c <= 10 for r, c in grids)
    with pytest.raises(Exception, match="keeps each image's aspect ratio"):
        NaflexPreprocess(mode="pad")


def test_patches_go_back_on_their_grid_for_the_image_statistics():
    from medsig.data.image_stats import image_stats, pixel_stats

    pre = NaflexPreprocess(patch_size=4, max_num_patches=16)
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (8, 32, 3), dtype=np.uint8))
    batch = stack_pixels([pre.to_uint8(wide), pre.to_uint8(wide.rotate(90, expand=True))])
    first = batch.images()[0]
    rows, cols = batch.spatial_shapes[0].tolist()
    assert first.shape == (3, rows * 4, cols * 4) and cols > rows  # wide stays wide
    resized = np.asarray(wide.resize((cols * 4, rows * 4), Image.BILINEAR))
    assert np.abs(first.permute(1, 2, 0).numpy().astype(int) - resized.astype(int)).max() <= 1
    normalised = pixel_stats(pre.normalize(batch), pre)  # normalisation undone, same numbers
    assert np.allclose(normalised, pixel_stats(batch, pre), atol=1e-4)
    assert np.allclose(normalised[0], image_stats(first.permute(1, 2, 0).numpy()), atol=1e-4)


def test_text_is_lower_cased_and_padded_to_64():
    """The published checkpoints load a GemmaTokenizer that keeps case; SigLIP 2 was trained
    on lower-cased text (Siglip2Tokenizer): medsig equals the latter, padded at the end."""
    from transformers import GemmaTokenizer, Siglip2Config
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    from medsig.models.encoder import Encoder
    from medsig.models.families import detect_family

    assert detect_family("/any/folder", Siglip2Config()) == FAMILY
    vocab, merges = _gemma_vocab()
    published = GemmaTokenizer(vocab=dict(vocab), merges=list(merges))
    trained = Siglip2Tokenizer(vocab=dict(vocab), merges=list(merges))
    ref = trained(TEXTS, padding="max_length", max_length=64, truncation=True,
                  padding_side="right")["input_ids"]
    enc = Encoder(None, _processor(), published, "siglip", FAMILY, torch.device("cpu"), None,
                  64, FAMILY)
    assert enc.tokenize(TEXTS)["input_ids"].tolist() == ref
    assert len(trained(TEXTS[2])["input_ids"]) > 64  # the long text really is truncated


# -- a tiny NaFlex checkpoint, trained, reloaded ------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_like
    from medsig.train import train

    root = tmp_path_factory.mktemp("naflex")
    spec = synthesize("derm", root / "data", n=40, seed=0, image_size=40)
    collection = load_collection(spec)
    write_split(collection, split_collection(collection, seed=0), spec.parent)
    set_spec_splits(spec, "splits.csv")
    tiny = write_like(root / "tiny", LIKE, layers=1, hidden_size=32)
    base = {"spec": str(spec), "model": str(tiny), "labels": ["urgent"], "seed": 0,
            "precision": "fp32", "device": "cpu", "num_workers": 0, "max_num_patches": 64,
            "eval": {"at_start": False},
            "optim": {"epochs": 1, "max_steps": 2, "batch_size": 8, "lr": 1e-3}}
    folders = {kind: train({**base, "out": str(root / kind), "objective": kind})
               for kind in ("contrastive", "classify")}
    wide = root / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 150, 3), np.uint8)).save(wide)
    return SimpleNamespace(spec=spec, tiny=tiny, collection=load_collection(spec),
                           wide=wide, **folders)


def test_tiny_like_has_the_naflex_architecture(env):
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(env.tiny)
    assert cfg.model_type == "siglip2" and cfg.vision_config.patch_size == 16
    assert cfg.vision_config.num_patches == 256 and cfg.text_config.max_position_embeddings == 64
    proc = AutoProcessor.from_pretrained(env.tiny)
    assert proc.image_processor.max_num_patches == 256 and proc.image_processor.resample == 2
    assert json.loads((env.tiny / "medsig_tiny.json").read_text())["like"] == LIKE


def test_embeddings_equal_a_plain_transformers_forward(env):
    from transformers import AutoModel, AutoProcessor

    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder

    enc = Encoder.load(env.tiny, device="cpu")
    assert enc.family == FAMILY and enc.preprocess.max_num_patches == 256
    image, text, kept, _ = embed_arrays(enc, env.collection, batch_size=16, num_workers=0)
    rows = kept[:6].tolist()
    model = AutoModel.from_pretrained(env.tiny).eval()
    proc = AutoProcessor.from_pretrained(env.tiny)
    decoded = [load_image(env.collection.image_paths[r]) for r in rows]
    texts = [env.collection.text(r).lower() for r in rows]
    tokens = proc.tokenizer(texts, padding="max_length", max_length=64, truncation=True,
                            padding_side="right", return_tensors="pt")
    with torch.no_grad():
        ref_img = model.get_image_features(**proc.image_processor(
            images=decoded, return_tensors="pt")).pooler_output
        ref_txt = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output
    np.testing.assert_allclose(image[:6], F.normalize(ref_img, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(text[:6], F.normalize(ref_txt, dim=-1).numpy(), atol=1e-5)


def test_trained_folders_record_and_reload_the_pipeline(env):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from medsig.models.artifact import Artifact
    from medsig.models.heads import head_probabilities
    from medsig.models.predictor import load_predictor

    for folder in (env.contrastive, env.classify):
        art = Artifact.load(folder)
        assert (art.preprocessing.max_num_patches, art.preprocessing.patch_size) == (64, 16)
        record = json.loads((folder / "preprocessor_config.json").read_text())
        assert record["max_num_patches"] == 64  # plain transformers applies it too
        assert record["medsig_preprocess"]["family"] == FAMILY
    predictor = load_predictor(env.classify)
    assert predictor.preprocess.max_num_patches == 64
    pixels = stack_pixels([predictor.preprocess(load_image(env.wide))])
    assert pixels.spatial_shapes.tolist() == [[4, 13]]  # 48 x 150 kept its aspect ratio
    ours = predictor.raw_probabilities(pixels)
    model = AutoModelForImageClassification.from_pretrained(env.classify).eval()
    inputs = AutoImageProcessor.from_pretrained(env.classify)(
        images=load_image(env.wide), return_tensors="pt")
    with torch.no_grad():
        ref = head_probabilities(model(**inputs).logits, predictor.heads).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    contrastive = load_predictor(env.contrastive, spec=env.spec, labels=["urgent"])
    assert contrastive.encoder.preprocess.max_num_patches == 64
    from transformers import AutoModel, AutoProcessor

    plain = AutoModel.from_pretrained(env.contrastive).eval()
    inputs = AutoProcessor.from_pretrained(env.contrastive).image_processor(
        images=load_image(env.wide), return_tensors="pt")
    with torch.no_grad():
        ref = F.normalize(plain.get_image_features(**inputs).pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(contrastive.embed(pixels), ref, atol=1e-5)


def test_a_naflex_classifier_without_medsig_records_loads(env, tmp_path):
    """A plain Siglip2ForImageClassification folder (no medsig.json, no record): NaFlex
    inputs from its processor's own max_num_patches, features pooled over real patches."""
    import shutil

    from transformers import AutoModelForImageClassification

    from medsig.models.encoder import Encoder

    plain = tmp_path / "plain"
    shutil.copytree(env.classify, plain)
    (plain / "medsig.json").unlink()
    config = json.loads((plain / "preprocessor_config.json").read_text())
    config.pop("medsig_preprocess")
    (plain / "preprocessor_config.json").write_text(json.dumps(config))
    enc = Encoder.load(plain, device="cpu")
    assert enc.family == FAMILY and enc.kind == "image"
    assert enc.preprocess.max_num_patches == 64
    pixels = stack_pixels([enc.preprocess(load_image(env.wide))])
    model = AutoModelForImageClassification.from_pretrained(plain).eval()
    with torch.no_grad():
        logits = model(**pixels.inputs()).logits
        ours = model.classifier(enc.image_features(pixels))
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-5)


def test_serve_sees_a_wide_image_as_medsig_does(env):
    """/v1/predict's OOD score (embedding + image statistics of the patches put back on their
    grid) equals medsig's own on the NaFlex patches of the same wide image."""
    from fastapi.testclient import TestClient

    from medsig.models.predictor import load_predictor
    from medsig.serve.app import create_app

    predictor = load_predictor(env.classify)
    pixels = stack_pixels([predictor.preprocess(load_image(env.wide))])
    from medsig.models.ood import pixel_scores

    gate = predictor.safety.ood
    expected = float(gate.combined(pixel_scores(gate, predictor, pixels))[0])
    with TestClient(create_app(Path(env.classify))) as client:
        r = client.post("/v1/predict", files={"file": ("w.png", env.wide.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.json()["ood"]["score"] == pytest.approx(expected, rel=1e-4)


def test_augmentation_keeps_a_wide_image_wide():
    from medsig.data.transforms import Augment

    image = Image.new("RGB", (300, 100), (90, 40, 20))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w, h = Augment(32, keep_aspect=True)(image, generator=g).size
        assert 3 * 0.7 < w / h < 3 * 1.4 and 0.8 < w * h / 32 ** 2 < 1.2
    assert Augment(32)(image, generator=torch.Generator().manual_seed(0)).size == (32, 32)
