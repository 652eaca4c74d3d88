"""Per-family reference inputs: how each model family was fed images and text.

One small registry (``FAMILIES``) of what differs between SigLIP, SigLIP 2 (fixed
resolution and NaFlex: ``medsig.models.naflex``), MedSigLIP-448 and CLIP, read together with
the checkpoint's own processor configuration (size, resampling filter, mean/std, crop) and
tokenizer. The sources of every entry are in docs/models.md ("Reference inputs per family").

The chosen pipeline is recorded in the model folder (``preprocessor_config.json`` key
``medsig_preprocess``, ignored by transformers) so training, evaluation, serving and a later
``Encoder.load`` of the saved folder apply the same one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medsig.data.transforms import MODES, Preprocess
from medsig.models import naflex

RECORD_KEY = "medsig_preprocess"
DEFAULT_MODE = "reference"


@dataclass(frozen=True)
class Family:
    """What a family's published pipeline does beyond its processor config."""

    name: str
    resize_method: str = "pil"  # pil: the processor's filter; tf_bilinear: MedSigLIP notebooks
    text_padding: str | None = "max_length"  # max_length (SigLIP) | longest (CLIP) | None
    text_length: int | None = 64  # tokens (capped by the model's position embeddings)
    lowercase: bool = False  # lower-case texts before the tokenizer


FAMILIES: dict[str, Family] = {
    # SiglipTokenizer lower-cases and strips punctuation itself (do_lower_case=True)
    "siglip": Family("siglip"),
    # trained on lower-cased text; the published checkpoints' Gemma tokenizer does not
    "siglip2": Family("siglip2", lowercase=True),
    # SigLIP 2 NaFlex (Siglip2Model): aspect ratio kept, at most max_num_patches patches
    naflex.FAMILY: Family(naflex.FAMILY, lowercase=True),
    # the quick-start notebook resizes with tf.image.resize(bilinear, antialias=False)
    "medsiglip": Family("medsiglip", resize_method="tf_bilinear"),
    # CLIPTokenizer lower-cases itself; causal text tower pooled at EOS: pad to the batch
    "clip": Family("clip", text_padding="longest", text_length=77),
    "image": Family("image", text_padding=None, text_length=None),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def detect_family(name: str, config: Any, tokenizer: Any = None, has_text: bool = True) -> str:
    """The family of a checkpoint from its id, config and tokenizer (a record wins)."""
    model_type = str(getattr(config, "model_type", "")).lower()
    lowered = str(name).lower()
    if model_type in ("siglip2", "siglip2_vision_model"):  # NaFlex inputs, also for its
        return naflex.FAMILY  # classifier / vision tower (fixed-resolution SigLIP 2: "siglip")
    if not has_text:
        return "image"
    if model_type == "clip":
        return "clip"
    if "medsiglip" in lowered:
        return "medsiglip"
    tok_class = type(tokenizer).__name__.lower() if tokenizer is not None else ""
    text_cfg = getattr(config, "text_config", None)
    vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    if "siglip2" in lowered or "gemma" in tok_class or "siglip2" in tok_class or vocab >= 256000:
        return "siglip2"
    return "siglip"


def family_of(name_or_path: str | Path) -> str:
    """The family a folder recorded, else detected from its config (no weights loaded)."""
    from transformers import AutoConfig

    recorded = read_record(name_or_path).get("family")
    if recorded in FAMILIES:
        return str(recorded)
    config = AutoConfig.from_pretrained(str(name_or_path))
    has_text = getattr(config, "text_config", None) is not None
    return detect_family(str(name_or_path), config, None, has_text)


def prepare_texts(texts: list[str], family: Family) -> list[str]:
    """Texts as the family was trained on them (SigLIP 2: lower-cased)."""
    return [t.lower() for t in texts] if family.lowercase else list(texts)


def text_length(family: Family, max_positions: int | None) -> int | None:
    """The family's text length, capped by the model's position embeddings."""
    if family.text_length is None:
        return max_positions
    return min(family.text_length, max_positions) if max_positions else family.text_length


def family_preprocess(processor: Any, family: str, mode: str = DEFAULT_MODE,
                      max_num_patches: int | None = None) -> Any:
    """The image pipeline of ``family`` in ``mode`` (``reference`` = the published one): a
    ``Preprocess``, or for SigLIP 2 NaFlex a ``NaflexPreprocess`` (``max_num_patches``:
    None = the processor's)."""
    if mode not in MODES:
        raise ValueError(f"preprocess mode must be one of {MODES}, not {mode!r}")
    if family == naflex.FAMILY:
        return naflex.NaflexPreprocess.from_processor(processor, mode, max_num_patches)
    method = get_family(family).resize_method if mode == "reference" else "pil"
    return Preprocess.from_processor(processor, mode=mode, resize_method=method)


def read_record(folder: str | Path) -> dict[str, Any]:
    """The recorded pipeline of a model folder ({} when none or not a folder)."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        record = json.loads(path.read_text()).get(RECORD_KEY) or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(folder: str | Path, family: str, preprocess: Any,
                 text: dict[str, Any] | None = None) -> None:
    """Record family, image pipeline and text rules in ``folder/preprocessor_config.json``
    (NaFlex: also the processor's own ``max_num_patches``, so plain transformers applies it)."""
    path = Path(folder) / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if getattr(preprocess, "max_num_patches", None) and "max_num_patches" in config:
        config["max_num_patches"] = int(preprocess.max_num_patches)
    config[RECORD_KEY] = {"family": family, **preprocess.describe(),
                          "text": text or text_rules(get_family(family))}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def text_rules(family: Family) -> dict[str, Any]:
    out = asdict(family)
    return {k: out[k] for k in ("text_padding", "text_length", "lowercase")}
