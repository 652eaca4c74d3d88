"""Load any Hugging Face image-text or image-only checkpoint and embed images and texts.

One code path for a hub id or a local folder: ``AutoConfig`` → ``AutoModel`` (or
``AutoModelForImageClassification`` for a classifier checkpoint), ``AutoImageProcessor``,
``AutoTokenizer``. Kinds:

- ``siglip`` (SigLIP, SigLIP 2 fixed-resolution and NaFlex, MedSigLIP): sigmoid logits with
  scale and bias; texts padded to the model's max length, as SigLIP was trained (NaFlex
  pixels are ``medsig.data.patches.Patches``: patches, their mask and the grid shape);
- ``clip``: softmax logits with a scale; texts padded to the longest with an attention mask;
- ``image`` (ViT, DINOv2, a medsig classifier...): image embeddings only (CLS token, or the
  classifier's mean-pooled features).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medsig.data.patches import Patches, model_inputs
from medsig.errors import ConfigError
from medsig.models import families
from medsig.models.artifact import save_model
from medsig.models.device import precision_dtype, select_device

_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError)


def resolve_cached(name: str) -> str:
    """The local snapshot folder of a hub id already in the Hugging Face cache, else ``name``.

    Loading from the folder makes no network call at all (an air-gapped machine would
    otherwise spend half a minute in retries before using the cache).
    """
    if Path(name).exists():
        return name
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id: let transformers say so
        return name
    return str(Path(cached).parent) if isinstance(cached, str) else name


def load_image_processor(source: str) -> Any:
    """``AutoImageProcessor`` of a hub id or folder; a medsig classifier folder's own
    processor (``hf_image_processor``, named in its auto_map) without running its copy."""
    from transformers import AutoImageProcessor

    config = Path(source) / "preprocessor_config.json"
    if config.is_file() and "MedsigImageProcessor" in config.read_text():
        from medsig.models.hf_image_processor import MedsigImageProcessor

        return MedsigImageProcessor.from_pretrained(source)
    return AutoImageProcessor.from_pretrained(source)


def _from_pretrained(source: str, classifier: bool, dtype: torch.dtype,
                     device: torch.device) -> Any:
    """The model in ``dtype``, with SDPA attention where the architecture has it, its
    weights written straight into the device's memory (no CPU copy first)."""
    from transformers import AutoModel, AutoModelForImageClassification

    auto = AutoModelForImageClassification if classifier else AutoModel
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type != "cpu":
        kwargs["device_map"] = str(device)
    try:
        return auto.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:  # an architecture without SDPA: its default attention
        if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
            raise
        return auto.from_pretrained(source, **kwargs)


def _tokenize(tokenizer: Any, padding: str | bool, max_length: int, family: Any,
              texts: Sequence[str]) -> dict[str, Tensor]:
    # right padding always: SigLIP pools the last position and was trained padded at the end
    # (some published tokenizers default to left padding)
    out = tokenizer(families.prepare_texts(list(texts), family), padding=padding,
                    truncation=True, max_length=max_length, padding_side="right",
                    return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask")}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class Encoder:
    """A loaded checkpoint with embedding functions (see module docstring)."""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, kind: str, name: str,
                 device: torch.device, preprocess: str | None = None, max_text_len: int = 64,
                 family: str | None = None, max_num_patches: int | None = None) -> None:
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.kind, self.name, self.device = kind, name, device
        self.family = family or ("image" if kind == "image" else kind)
        self.preprocess = families.family_preprocess(
            image_processor, self.family, preprocess or families.DEFAULT_MODE, max_num_patches)
        self.image_size = int(self.preprocess.size)
        self.max_text_len = families.text_length(families.get_family(self.family),
                                                 max_text_len)
        self._embed_dim: int | None = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device | None = None,
             preprocess: str | None = None, dtype: torch.dtype | None = None,
             precision: str | None = None, family: str | None = None,
             max_num_patches: int | None = None) -> Encoder:
        """Load ``name_or_path`` (hub id or folder) straight onto the device with SDPA
        attention; ``precision`` (auto | fp32 | bf16 | fp16, see ``precision_dtype``):
        by default fp32 on CPU, bf16 (fp16 without bf16) on CUDA. ``preprocess`` /
        ``family``: None = what the folder recorded, else the family's reference pipeline
        (``medsig.models.families``); ``max_num_patches`` (SigLIP 2 NaFlex): None = what
        the folder recorded, else its processor's."""
        from transformers import AutoConfig

        name = str(name_or_path)
        if is_adapter_folder(name):  # a LoRA adapter: its base + the adapter, merged
            return load_adapter(cls, name, device, preprocess,
                                dtype or precision_dtype(precision, select_device(device)),
                                max_num_patches or families.read_record(name).get(
                                    "max_num_patches"))
        device = select_device(device)
        source = resolve_cached(name)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # SigLIP's default sub-config warns about CLIP ids
        try:
            config = AutoConfig.from_pretrained(source)
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"cannot load model '{name}': {_first_line(exc)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        model_type = str(getattr(config, "model_type", ""))
        archs = list(getattr(config, "architectures", None) or [])
        classifier = any(a.endswith("ForImageClassification") for a in archs)
        dtype = dtype or precision_dtype(precision, device)
        try:
            model = _from_pretrained(source, classifier, dtype, device)
            image_processor = load_image_processor(source)
        except _LOAD_ERRORS as exc:
            raise ConfigError(f"cannot load model '{name}': {_first_line(exc)}") from None
        has_text = hasattr(model, "get_text_features") and not classifier
        tokenizer = None
        if has_text:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except _LOAD_ERRORS as exc:
                raise ConfigError(f"model '{name}' has text features but its tokenizer does "
                                  f"not load: {_first_line(exc)}") from None
        kind = "image"
        if has_text:
            kind = "siglip" if hasattr(model, "logit_bias") or "siglip" in model_type else "clip"
        text_cfg = getattr(config, "text_config", None)
        max_len = int(getattr(text_cfg, "max_position_embeddings", 64) or 64)
        record = families.read_record(source)
        family = family or record.get("family") or families.detect_family(
            name, config, tokenizer, has_text)
        model.to(device).eval()  # a no-op when loaded onto the device
        return cls(model, image_processor, tokenizer, kind, name, device,
                   preprocess or record.get("mode"), max_len, family,
                   max_num_patches or record.get("max_num_patches"))

    def save(self, out: str | Path) -> Path:
        """``save_pretrained`` of the model, tokenizer and image processor."""
        out = Path(out)
        save_model(self.model, out)
        self.image_processor.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        families.write_record(out, self.family, self.preprocess)
        return out

    # -- properties ------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:
            cfg = self.model.config
            dim = getattr(cfg, "projection_dim", None) if self.kind == "clip" else None
            if dim is None:
                vision = getattr(cfg, "vision_config", cfg)
                dim = getattr(vision, "hidden_size", None)
            if dim is None:  # unusual config: measure it
                with torch.no_grad():
                    x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device,
                                    dtype=self.dtype)
                    dim = self.image_features(x).shape[-1]
            self._embed_dim = int(dim)
        return self._embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> Tensor | None:
        return getattr(self.model, "logit_scale", None)

    @property
    def logit_bias(self) -> Tensor | None:
        return getattr(self.model, "logit_bias", None)

    # -- features (differentiable, unnormalised) ---------------------------------------------
    def pixels(self, pixel_values: Tensor) -> Tensor:
        """Model input on the device: uint8 batches (``Preprocess.to_uint8``) are copied
        without blocking and normalised there; float batches are only cast."""
        x = pixel_values.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = self.preprocess.normalize(x)
        return x.to(self.dtype)

    def image_features(self, pixel_values: Tensor | Patches) -> Tensor:
        pixel_values = self.pixels(pixel_values)
        inputs = model_inputs(pixel_values)  # NaFlex: + pixel_attention_mask, spatial_shapes
        if self.kind != "image":
            return self.model.get_image_features(**inputs).pooler_output
        if hasattr(self.model, "classifier"):  # a classifier checkpoint: its pooled features
            backbone = getattr(self.model, "vision_model", None) or self.model.base_model
            hidden = backbone(**inputs).last_hidden_state
            if self.model.config.model_type == "clip":
                hidden = hidden[:, 1:]
            if isinstance(pixel_values, Patches):  # the mean over real patches, as it pools
                mask = pixel_values.pixel_attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            return hidden.mean(dim=1)
        out = self.model(**inputs)
        if isinstance(pixel_values, Patches):  # a NaFlex vision tower: its attention pooling
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.tokenizer is None:
            raise ConfigError(f"model '{self.name}' is image-only: it has no text encoder")
        kwargs: dict[str, Tensor] = {"input_ids": input_ids.to(self.device, non_blocking=True)}
        if attention_mask is not None and self.kind == "clip":
            kwargs["attention_mask"] = attention_mask.to(self.device, non_blocking=True)
        return self.model.get_text_features(**kwargs).pooler_output

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids (and attention mask) for ``texts`` as the model expects them."""
        if self.tokenizer is None:
            raise ConfigError(f"model '{self.name}' is image-only: it has no tokenizer")
        return self.tokenize_fn()(texts)

    def tokenize_fn(self) -> Callable[[Sequence[str]], dict[str, Tensor]]:
        """``tokenize`` as a picklable function of the tokenizer alone (for data workers)."""
        family = families.get_family(self.family)
        padding = "max_length" if family.text_padding == "max_length" else True
        return partial(_tokenize, self.tokenizer, padding, self.max_text_len, family)

    # -- embeddings (no grad, L2-normalised, float32 on CPU) -------------------------------
    @torch.inference_mode()
    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.image_embeddings(pixel_values).cpu()

    @torch.inference_mode()
    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings left on the device (no host sync)."""
        return F.normalize(self.image_features(pixel_values).float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, tokens: dict[str, Tensor]) -> Tensor:
        """L2-normalised float32 text embeddings of ``tokenize`` output, on the device."""
        feats = self.text_features(tokens["input_ids"], tokens.get("attention_mask"))
        return F.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim)
        parts = []
        for start in range(0, len(texts), batch_size):
            parts.append(self.text_embeddings(self.tokenize(texts[start:start + batch_size])))
        return torch.cat(parts).cpu()

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, kind={self.kind}, image_size={self.image_size}, "
                f"dim={self.embed_dim}, device={self.device})")


def is_adapter_folder(name: str) -> bool:
    """A peft LoRA adapter folder (adapter_config.json, no full model config)."""
    folder = Path(name)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_adapter(cls: type[Encoder], folder: str, device: Any, preprocess: str,
                 dtype: torch.dtype | None, max_num_patches: int | None = None) -> Encoder:
    """The adapter's base model (hub id or folder-relative path in adapter_config.json) with
    the LoRA weights merged in; the folder's own processor and tokenizer when present."""
    from peft import PeftModel

    from medsig.models.artifact import adapter_base

    base = adapter_base(folder)
    encoder = cls.load(str(base), device=device, preprocess=preprocess, dtype=dtype,
                       max_num_patches=max_num_patches)
    try:
        model = PeftModel.from_pretrained(encoder.model, folder)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"cannot load the LoRA adapter in '{folder}': {_first_line(exc)}"
                          ) from None
    encoder.model = model.merge_and_unload().to(encoder.device).eval()
    encoder.name = folder
    return encoder
