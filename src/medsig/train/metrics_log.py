"""Training losses kept on the device and read back every few steps (one host sync).

Reading a CUDA loss with ``float()`` after every step stalls the CPU until the GPU is done,
so the next step cannot be queued while this one runs. ``StepLosses`` stacks the step losses
on the device and converts them all at once when ``due`` (every ``every`` steps on an
accelerator, every step on CPU where reading is free) or before a checkpoint or evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

GPU_EVERY = 10


class StepLosses:
    def __init__(self, device: torch.device | str, every: int | None = None) -> None:
        dev = torch.device(device)
        self.every = every if every is not None else (1 if dev.type == "cpu" else GPU_EVERY)
        self.pending: list[tuple[dict[str, Any], Tensor]] = []

    def add(self, row: dict[str, Any], loss: Tensor | float) -> None:
        """Queue one step's row (step, epoch, lr ...) and its loss (not read yet)."""
        value = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        self.pending.append((row, value))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def flush(self, on_row: Callable[[dict[str, Any]], None],
              on_bad: Callable[[dict[str, Any], float], None]) -> float | None:
        """Read all queued losses (one sync); ``on_bad(row, loss)`` for the first
        non-finite one (it should raise), else ``on_row`` per row; the last loss."""
        if not self.pending:
            return None
        values = torch.stack([v.float().reshape(()) for _, v in self.pending]).tolist()
        rows = [r for r, _ in self.pending]
        self.pending = []
        for row, value in zip(rows, values):
            if not math.isfinite(value):
                on_bad(row, value)
        for row, value in zip(rows, values):
            on_row({**row, "train/loss": value})  # keeps the row's key order
        return values[-1]
