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


def training_precision(device: torch.device) -> str:
    """accelerate's mixed_precision for ``device``: bf16, fp16 (loss scaling) or no."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"
