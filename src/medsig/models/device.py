"""Device and precision selection: CUDA > MPS > CPU, fp32 on CPU."""

from __future__ import annotations

import torch

from medsig.errors import ConfigError


def select_device(preference: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` picks CUDA, then Apple MPS, then CPU; otherwise checks availability."""
    if isinstance(preference, torch.device):
        return preference
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise ConfigError(f"unknown device '{preference}' (use auto, cpu, cuda, cuda:N or mps)"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{preference}' requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{preference}' requested but MPS is not available")
    return device


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (no bf16 hardware there)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def training_precision(precision: str, device: torch.device) -> str:
    """accelerate's mixed_precision for a config value on ``device``: ``no`` (fp32), ``bf16``
    or ``fp16`` (loss scaling); ``auto`` is bf16 on GPUs that have it, fp16 on older ones,
    fp32 elsewhere."""
    p = check_precision(precision)
    if p == "fp32" or (p == "auto" and device.type != "cuda"):
        return "no"
    if p == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp16" and device.type == "cpu":
        raise ConfigError("precision 'fp16' needs a GPU; use fp32 (or bf16) on CPU")
    return p


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_default_precision = "auto"


def set_default_precision(precision: str | None) -> None:
    """The precision ``Encoder.load`` uses when none is given (set once by the CLI)."""
    global _default_precision
    _default_precision = check_precision(precision or "auto")


def check_precision(precision: str) -> str:
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    return p


def precision_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """The weights' dtype for ``precision`` on ``device``; ``auto`` (the default) is
    ``inference_dtype``: bf16 on CUDA (fp16 without bf16), fp16 on MPS, fp32 on CPU."""
    p = check_precision(precision or _default_precision)
    if p == "auto":
        return inference_dtype(device)
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if p == "fp32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 storage, TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return _DTYPES[p]


def default_batch_size(device: torch.device) -> int:
    """Images per inference batch: 256 on CUDA (the GPU needs big batches), 64 elsewhere."""
    return 256 if device.type == "cuda" else 64


def pin_memory(device: torch.device) -> bool:
    """Page-locked host buffers pay only for CUDA copies."""
    return device.type == "cuda"


def inference_settings(precision: str, batch_size: int | None, device: str | None) -> int:
    """The CLI's ``--precision`` made the encoders' default; ``--batch-size`` checked and
    defaulted for the device."""
    set_default_precision(precision)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    return batch_size or default_batch_size(select_device(device))
