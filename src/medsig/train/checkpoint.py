"""Resumable training state: trainable weights, optimizer, scheduler, scaler, RNG, counters.

A checkpoint folder holds `trainable.safetensors`, `optimizer.pt`, `scheduler.pt`,
`scaler.pt` (fp16 only), `rng.pt` and `state.json`. Writes go to a temp folder that then
replaces the old one, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medsig.errors import ConfigError
from medsig.train.adapt import load_trainable_state, trainable_state

STATE = "state.json"
WEIGHTS = "trainable.safetensors"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _swap_in(tmp: Path, path: Path, previous: Path | None = None) -> None:
    """Replace `path` by `tmp`; the replaced folder becomes `previous` (or is deleted)."""
    old = previous or path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if previous is None and old.exists():
        shutil.rmtree(old)


def _tmp_dir(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_weights(path: Path, model: nn.Module, info: dict[str, Any] | None = None) -> None:
    """Only the trainable parameters (a frozen base is reloaded from the base model)."""
    path = Path(path)
    tmp = _tmp_dir(path)
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, tmp / WEIGHTS)
    (tmp / STATE).write_text(json.dumps(info or {}, indent=1, default=str))
    _swap_in(tmp, path)


def load_weights(path: Path, model: nn.Module) -> dict[str, Any]:
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise ConfigError("no weights in checkpoint folder", file=path)
    load_trainable_state(model, load_file(str(path / WEIGHTS)))
    return json.loads((path / STATE).read_text()) if (path / STATE).is_file() else {}


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: Any, scheduler: Any,
                    scaler: Any | None, state: dict[str, Any]) -> None:
    """Everything needed to continue exactly where training stopped."""
    path = Path(path)
    tmp = _tmp_dir(path)
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, tmp / WEIGHTS)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
    _swap_in(tmp, path, previous_of(path))


def previous_of(path: Path) -> Path:
    """The checkpoint kept before `path` (a fallback when `path` turns out to diverge)."""
    return Path(path).with_name(Path(path).name + ".previous")


def checkpoint_step(path: Path) -> int | None:
    file = Path(path) / STATE
    return int(json.loads(file.read_text())["step"]) if file.is_file() else None


def roll_back(path: Path, bad_step: int) -> int | None:
    """After a non-finite loss computed with the weights of step `bad_step`: if `path` holds
    those weights, put the previous checkpoint back. Returns the step now kept (or None)."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or step < bad_step:
        return step
    prev = previous_of(path)
    diverged = path.with_name(path.name + ".diverged")
    if diverged.exists():
        shutil.rmtree(diverged)
    path.rename(diverged)
    if checkpoint_step(prev) is not None:
        prev.rename(path)
        return checkpoint_step(path)
    return None


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: Any, scheduler: Any,
                    scaler: Any | None) -> dict[str, Any]:
    """Restore a checkpoint written by save_checkpoint; returns its state dict."""
    path = Path(path)
    needed = [WEIGHTS, "optimizer.pt", "scheduler.pt", "rng.pt", STATE]
    absent = [n for n in needed if not (path / n).is_file()]
    if absent:
        raise ConfigError(f"incomplete checkpoint (missing {', '.join(absent)})", file=path)
    load_trainable_state(model, load_file(str(path / WEIGHTS)))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE).read_text())
