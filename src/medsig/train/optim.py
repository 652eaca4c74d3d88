"""Optimizer construction tuned to the device: fused AdamW on CUDA (a few kernels for all
parameters instead of several per tensor); torch's default implementation elsewhere (on
CPU the numbers stay exactly those of earlier runs)."""

from __future__ import annotations

from typing import Any

import torch


def adamw_options(device: torch.device | str) -> dict[str, Any]:
    """``fused=True`` on CUDA (measured in bench/gpu.py), torch's default elsewhere."""
    if torch.device(device).type == "cuda":
        return {"fused": True}
    return {}


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the implementation their parameters' device runs fastest."""
    first = next(p for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, **adamw_options(first.device))
