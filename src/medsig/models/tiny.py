"""Small randomly initialised checkpoints, written offline, that plain transformers loads.

Weights cannot be downloaded here, so tests, the demo and the benchmarks use
``write_tiny(out)``: a SigLIP / SigLIP 2 NaFlex / CLIP / ViT model with the real architecture
at a tiny size,
a byte-level BPE tokenizer trained locally (no unknown tokens) and the architecture's image
processor. ``AutoModel``, ``AutoTokenizer``, ``AutoImageProcessor`` and ``AutoProcessor``
load the folder exactly as they load a hub checkpoint, so every code path is the real one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from medsig.models.artifact import save_model

ARCHS = ("siglip", "siglip2", "clip", "vit")

# Words of the three generated datasets plus common clinical English: the BPE merges learn
# them, and anything else still tokenizes byte by byte.
_CORPUS_WORDS = """
a an the of with and or on in at to from for by no not without showing image photo picture
dermatological clinical presentation skin lesion rash eczema psoriasis acne urticaria
dermatitis melanoma nevus mole wart infection fungal bacterial viral allergic contact
atopic seborrheic rosacea vitiligo keratosis carcinoma basal squamous cell erythema edema
wound surgical incision healing healed not progressing infected exudate serous purulent
sanguineous none low medium high risk urgency green yellow red home care needs attention
abdomen breast knee hip arm leg face hand foot back chest cesarean section post operative
chest x ray radiograph xray ct mri scan lung lungs pneumonia opacity consolidation effusion
pleural cardiomegaly nodule mass fracture normal abnormal left right bilateral upper lower
lobe view pa ap lateral supine patient male female age years old child adult elderly
fitzpatrick type i ii iii iv v vi tone light dark brown pale itchy painful swelling redness
blister scale plaque papule macule patch ulcer crust scab spot ring red blue purple circle
square triangle stripe texture round irregular border color colour small large
covid viral sars streptococcus todo finding unknown other condition category
""".split()


def _corpus() -> list[str]:
    words = _CORPUS_WORDS
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [f"A dermatological image showing {w}." for w in words]
    lines += [f"Clinical presentation of {w}: {v}" for w, v in zip(words, reversed(words))]
    lines += [f"Chest X-ray: {w} in the {v} lobe." for w, v in zip(words[::2], words[1::2])]
    lines += [str(i) for i in range(200)]
    return lines


def train_tokenizer(vocab_size: int = 1000, arch: str = "siglip"):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on a built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if arch == "clip":  # CLIP: <s> text </s>, pooled at </s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    else:  # SigLIP: text </s>, padded to max length
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def train_gemma_tokenizer(vocab_size: int = 1000):
    """A Gemma-style tokenizer (``GemmaTokenizer``: BPE on ``▁``-joined text with byte
    fallback), as SigLIP 2 checkpoints publish, trained on the built-in corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    corpus = _corpus()
    tok.train_from_iterator(corpus + [line.lower() for line in corpus], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    tokens = list(dict.fromkeys(specials + [f"<0x{i:02X}>" for i in range(256)] + learned))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def _image_processor(arch: str, image_size: int, resample: int | None = None,
                     patch_size: int = 16):
    size = {"height": image_size, "width": image_size}
    extra = {} if resample is None else {"resample": resample}
    if arch == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size,
                                     do_center_crop=True, **extra)
    if arch == "siglip2":  # NaFlex: no fixed size; at most (image_size / patch)² patches
        from transformers.models.siglip2.image_processing_pil_siglip2 import (
            Siglip2ImageProcessorPil,
        )

        return Siglip2ImageProcessorPil(patch_size=patch_size,
                                        max_num_patches=(image_size // patch_size) ** 2, **extra)
    if arch == "vit":
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        return ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size=size, **extra)


def _tower(hidden: int, layers: int, heads: int, intermediate: int | None = None) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads)


def _config(arch: str, vision: dict, text: dict, image_size: int, patch_size: int,
            vocab_size: int, max_text_len: int, tokenizer, projection: int | None = None):
    vision = dict(vision, image_size=image_size, patch_size=patch_size, num_channels=3)
    text = dict(text, vocab_size=vocab_size, max_position_embeddings=max_text_len,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    if arch == "siglip":
        from transformers import SiglipConfig

        return SiglipConfig(text_config=text, vision_config=vision)
    if arch == "siglip2":  # NaFlex: a (image_size / patch)² grid of position embeddings
        from transformers import Siglip2Config

        vision.pop("image_size")
        vision["num_patches"] = (image_size // patch_size) ** 2
        return Siglip2Config(text_config=text, vision_config=vision)
    if arch == "clip":
        from transformers import CLIPConfig

        dim = projection or vision["hidden_size"]
        return CLIPConfig(text_config=dict(text, projection_dim=dim),
                          vision_config=dict(vision, projection_dim=dim),
                          projection_dim=dim, logit_scale_init_value=math.log(10.0))
    from transformers import ViTConfig

    return ViTConfig(**vision)


def write_tiny(out: str | Path, arch: str = "siglip", image_size: int = 64, seed: int = 0,
               hidden_size: int = 64, layers: int = 2, heads: int = 4, patch_size: int = 8,
               vocab_size: int = 1000, max_text_len: int = 64) -> Path:
    """Write a random ``arch`` checkpoint to ``out`` and return the folder.

    SigLIP starts with logit scale log(10) and bias -10 (the paper's initialisation); CLIP with
    scale log(10). ``max_text_len`` is at least 64 by default so that transformers'
    zero-shot pipeline (which pads to 64) runs on it. Deterministic for a given ``seed``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tower = _tower(hidden_size, layers, heads)
    return _write(out, arch, tower, tower, image_size, patch_size, vocab_size, max_text_len,
                  seed, info={"hidden_size": hidden_size, "layers": layers, "heads": heads})


def _write(out: str | Path, arch: str, vision: dict, text: dict, image_size: int,
           patch_size: int, vocab_size: int, max_text_len: int, seed: int,
           info: dict, projection: int | None = None, resample: int | None = None) -> Path:
    from transformers import AutoModel

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = None if arch == "vit" else train_gemma_tokenizer(vocab_size) \
        if arch == "siglip2" else train_tokenizer(vocab_size, arch)
    vocab = len(tokenizer) if tokenizer is not None else vocab_size
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default sub-configs warn about CLIP's token ids
    try:
        config = _config(arch, vision, text, image_size, patch_size, vocab, max_text_len,
                         tokenizer or _NoTokenizer(), projection)
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if arch in ("siglip", "siglip2"):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    save_model(model, out)
    processor = _image_processor(arch, image_size, resample, patch_size)
    if tokenizer is not None:
        tokenizer.model_max_length = max_text_len
        from transformers import CLIPProcessor, Siglip2Processor, SiglipProcessor

        cls = {"siglip": SiglipProcessor, "siglip2": Siglip2Processor}.get(arch, CLIPProcessor)
        cls(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
        tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "medsig_tiny.json").write_text(json.dumps(
        {"arch": arch, "image_size": image_size, "seed": seed, "patch_size": patch_size,
         "max_text_len": max_text_len, **info, "random_init": True,
         "note": "randomly initialised test checkpoint; not a trained model"}, indent=2))
    return out


# ----------------------------------------------------------------------------- --like HUB_ID
@dataclass(frozen=True)
class Like:
    """The architecture of a public checkpoint: what `write_like` reproduces at random."""

    arch: str
    image_size: int
    patch_size: int
    vision: tuple[int, int, int, int]  # hidden, intermediate, layers, heads
    text: tuple[int, int, int, int]
    max_text_len: int
    vocab_size: int  # the real tokenizer's; the offline tokenizer here has ~1000 tokens
    resample: int  # PIL filter of the checkpoint's image processor (3 bicubic, 2 bilinear)
    projection: int | None = None  # CLIP projection_dim


# Values of the checkpoints' config.json / preprocessor_config.json (the hub cannot be
# reached here), from stored public copies:
# - SigLIP base / so400m towers, vocab 32000, 64 text positions: transformers'
#   SiglipConfig documentation and the SigLIP family table of kvmm (PyPI, kvmm/models/siglip/
#   config.py); so400m vision tower 1152 / 4304 / 27 layers / 16 heads / patch 14 / 384:
#   config.json of bczhou/TinyLLaVA-3.1B-SigLIP (copied from google/siglip-so400m-patch14-384).
#   SigLIP processors: resize to a square, mean = std = 0.5, resample 3 (bicubic).
# - MedSigLIP-448: the so400m towers at 448 px (model card: 400M vision + 400M text encoder,
#   448x448, up to 64 text tokens; a 448 px so400m vision config.json: kyutai/moshika-vis-mlx
#   siglip448.config). Its processor's resample is not in a stored copy: SigLIP's bicubic.
# - SigLIP 2 base-patch16-224 (fixed resolution, model_type "siglip"): base towers, Gemma
#   vocabulary 256000, 64 positions (kvmm siglip2 table); processor resample 2 (bilinear),
#   224 x 224 (stored SigLIP 2 fixed-resolution preprocessor configs).
# - CLIP ViT-B/32 and B/16: transformers' CLIPConfig defaults are openai/clip-vit-base-patch32
#   (vision 768 / 3072 / 12 / 12, text 512 / 2048 / 12 / 8, 77 positions, vocab 49408,
#   projection 512); B/16 differs only in the patch size. CLIP processor: shortest edge 224,
#   centre crop 224, OpenAI mean / std, bicubic.
# - SigLIP 2 NaFlex base-patch16 (model_type "siglip2", Siglip2Model): base towers, patch 16,
#   num_patches 256 (a 16 x 16 grid of position embeddings, resized per image), Gemma
#   vocabulary 256000, 64 positions; Siglip2ImageProcessor: max_num_patches 256, patch 16,
#   bilinear, mean = std = 0.5 (transformers' Siglip2VisionConfig / Siglip2ImageProcessor
#   defaults, documented against google/siglip2-base-patch16-naflex). ``image_size`` here is
#   the side of that grid in pixels: 16 x 16 = 256.
_SIGLIP_BASE = (768, 3072, 12, 12)
_SO400M = (1152, 4304, 27, 16)
LIKE: dict[str, Like] = {
    "google/siglip-base-patch16-224": Like("siglip", 224, 16, _SIGLIP_BASE, _SIGLIP_BASE, 64,
                                           32000, 3),
    "google/siglip-so400m-patch14-384": Like("siglip", 384, 14, _SO400M, _SO400M, 64, 32000, 3),
    "google/medsiglip-448": Like("siglip", 448, 14, _SO400M, _SO400M, 64, 32000, 3),
    "google/siglip2-base-patch16-224": Like("siglip", 224, 16, _SIGLIP_BASE, _SIGLIP_BASE, 64,
                                            256000, 2),
    "google/siglip2-base-patch16-naflex": Like("siglip2", 256, 16, _SIGLIP_BASE, _SIGLIP_BASE,
                                               64, 256000, 2),
    "openai/clip-vit-base-patch32": Like("clip", 224, 32, (768, 3072, 12, 12),
                                         (512, 2048, 12, 8), 77, 49408, 3, projection=512),
    "openai/clip-vit-base-patch16": Like("clip", 224, 16, (768, 3072, 12, 12),
                                         (512, 2048, 12, 8), 77, 49408, 3, projection=512),
}


def write_like(out: str | Path, hub_id: str, layers: int | None = None,
               hidden_size: int | None = None, seed: int = 0) -> Path:
    """A random checkpoint with ``hub_id``'s architecture: its image size, patch size, text
    positions, module names, activation and processor; optionally ``layers`` per tower
    (default: the real depth) and a narrower ``hidden_size`` for fast tests (then the
    intermediate size scales with it and heads keep 64 dimensions). The tokenizer is the
    offline one (vocabulary ~1000, not the real one)."""
    from medsig.errors import ConfigError

    spec = LIKE.get(hub_id)
    if spec is None:
        raise ConfigError(f"--like: no architecture recorded for '{hub_id}' (known: "
                          f"{', '.join(LIKE)})")
    if layers is not None and layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {layers}")
    if hidden_size is not None and (hidden_size < 16 or hidden_size % 16):
        raise ConfigError(f"--hidden must be a multiple of 16 (>= 16), got {hidden_size}")
    towers = [_like_tower(t, layers, hidden_size) for t in (spec.vision, spec.text)]
    projection = spec.projection if hidden_size is None else hidden_size
    info = {"like": hub_id, "layers": towers[0]["num_hidden_layers"],
            "hidden_size": towers[0]["hidden_size"],
            "real_layers": {"vision": spec.vision[2], "text": spec.text[2]},
            "real_vocab_size": spec.vocab_size}
    return _write(out, spec.arch, towers[0], towers[1], spec.image_size, spec.patch_size,
                  1000, spec.max_text_len, seed, info, projection, spec.resample)


def _like_tower(tower: tuple[int, int, int, int], layers: int | None,
                hidden: int | None) -> dict:
    width, inter, depth, heads = tower
    if hidden is not None:
        inter, heads, width = round(inter * hidden / width), max(1, hidden // 64), hidden
    return _tower(width, min(layers, depth) if layers else depth, heads, inter)


class _NoTokenizer:
    pad_token_id = 0
    bos_token_id = 2
    eos_token_id = 3
