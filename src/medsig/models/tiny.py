"""Small randomly initialised checkpoints, written offline, that plain transformers loads.

Weights cannot be downloaded here, so tests, the demo and the benchmarks use
``write_tiny(out)``: a SigLIP / CLIP / ViT model with the real architecture at a tiny size,
a byte-level BPE tokenizer trained locally (no unknown tokens) and the architecture's image
processor. ``AutoModel``, ``AutoTokenizer``, ``AutoImageProcessor`` and ``AutoProcessor``
load the folder exactly as they load a hub checkpoint, so every code path is the real one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

ARCHS = ("siglip", "clip", "vit")

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


def _image_processor(arch: str, image_size: int):
    size = {"height": image_size, "width": image_size}
    if arch == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size,
                                     do_center_crop=True)
    if arch == "vit":
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        return ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size=size)


def _config(arch: str, image_size: int, hidden_size: int, layers: int, heads: int,
            patch_size: int, vocab_size: int, max_text_len: int, tokenizer):
    common = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads)
    vision = dict(common, image_size=image_size, patch_size=patch_size, num_channels=3)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=max_text_len,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    if arch == "siglip":
        from transformers import SiglipConfig

        return SiglipConfig(text_config=text, vision_config=vision)
    if arch == "clip":
        from transformers import CLIPConfig

        return CLIPConfig(text_config=dict(text, projection_dim=hidden_size),
                          vision_config=dict(vision, projection_dim=hidden_size),
                          projection_dim=hidden_size, logit_scale_init_value=math.log(10.0))
    from transformers import ViTConfig

    return ViTConfig(**vision)


def write_tiny(out: str | Path, arch: str = "siglip", image_size: int = 64, seed: int = 0,
               hidden_size: int = 64, layers: int = 2, heads: int = 4, patch_size: int = 8,
               vocab_size: int = 1000, max_text_len: int = 32) -> Path:
    """Write a random ``arch`` checkpoint to ``out`` and return the folder.

    SigLIP starts with logit scale log(10) and bias -10 (the paper's initialisation); CLIP with
    scale log(10). The result is deterministic for a given ``seed``.
    """
    from transformers import AutoModel

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, arch) if arch != "vit" else None
    vocab = len(tokenizer) if tokenizer is not None else vocab_size
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default sub-configs warn about CLIP's token ids
    try:
        config = _config(arch, image_size, hidden_size, layers, heads, patch_size, vocab,
                         max_text_len, tokenizer or _NoTokenizer())
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if arch == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    model.save_pretrained(out)
    processor = _image_processor(arch, image_size)
    if tokenizer is not None:
        tokenizer.model_max_length = max_text_len
        from transformers import CLIPProcessor, SiglipProcessor

        cls = SiglipProcessor if arch == "siglip" else CLIPProcessor
        cls(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
        tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "medsig_tiny.json").write_text(json.dumps(
        {"arch": arch, "image_size": image_size, "seed": seed, "hidden_size": hidden_size,
         "layers": layers, "heads": heads, "patch_size": patch_size,
         "note": "randomly initialised test checkpoint; not a trained model"}, indent=2))
    return out


class _NoTokenizer:
    pad_token_id = 0
    bos_token_id = 2
    eos_token_id = 3
