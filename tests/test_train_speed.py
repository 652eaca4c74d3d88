"""Per-step host syncs removed from the training step: losses read back in groups, the
first non-finite one still stops the run; fused AdamW only on CUDA."""

from __future__ import annotations

import pytest
import torch

from medsig.train.metrics_log import GPU_EVERY, StepLosses
from medsig.train.optim import adamw, adamw_options


def test_losses_are_read_in_groups_with_the_rows_in_order():
    losses = StepLosses("cuda", every=None)  # an accelerator: read every GPU_EVERY steps
    assert losses.every == GPU_EVERY and StepLosses("cpu").every == 1
    losses = StepLosses("cpu", every=3)
    rows: list[dict] = []
    for step in (1, 2):
        losses.add({"step": step, "train/loss": None, "train/lr": 0.1}, torch.tensor(step / 2))
        assert not losses.due()
    losses.add({"step": 3, "train/loss": None, "train/lr": 0.1}, torch.tensor(1.5))
    assert losses.due()
    last = losses.flush(rows.append, lambda row, loss: None)
    assert last == 1.5 and [r["train/loss"] for r in rows] == [0.5, 1.0, 1.5]
    assert list(rows[0]) == ["step", "train/loss", "train/lr"]  # log.csv column order
    assert losses.flush(rows.append, lambda s, v: None) is None and len(rows) == 3


def test_the_first_non_finite_loss_stops_before_any_row_is_logged():
    losses = StepLosses("cpu", every=10)
    for step, value in ((1, 0.3), (2, float("nan")), (3, float("inf"))):
        losses.add({"step": step, "train/loss": None}, torch.tensor(value))
    rows: list[dict] = []

    def bad(row: dict, loss: float) -> None:
        raise RuntimeError(f"step {row['step']}: {loss}")

    with pytest.raises(RuntimeError, match="step 2: nan"):
        losses.flush(rows.append, bad)
    assert rows == [] and losses.pending == []


def test_adamw_is_fused_only_on_cuda():
    assert adamw_options("cuda") == {"fused": True} and adamw_options("cpu") == {}
    w = torch.nn.Parameter(torch.ones(3))
    opt = adamw([{"params": [w], "weight_decay": 0.0}], lr=0.1)
    assert not opt.defaults.get("fused")
