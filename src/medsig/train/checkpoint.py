"""Resumable training state: trainable weights, optimizer, scheduler, scaler, RNG, counters.

A checkpoint folder holds `trainable.safetensors`, `optimizer.pt`, `scheduler.pt`,
`scaler.pt` (fp16 only), `rng.json` + `rng.safetensors` and `state.json`. Writes go to a temp
folder that then replaces the old one, so an interrupted save never leaves a half-written
checkpoint. Nothing is unpickled on resume: the `.pt` state dicts load with
``torch.load(weights_only=True)`` (tensors and plain containers only), the RNG states are
JSON and safetensors, and a file holding anything else is refused with a ConfigError.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medsig.errors import ConfigError
from medsig.train.adapt import load_trainable_state, trainable_state
from medsig.train.distributed import load_optimizer_state, optimizer_state

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
RNG_JSON, RNG_TENSORS = "rng.json", "rng.safetensors"


@dataclass
class TrainState:
    """Everything a checkpoint must restore to continue a run exactly (state.json)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs finished
    batch: int = 0  # step batches of the current epoch's plan done
    plan: list[list[int]] | None = None  # the current epoch's global step batches
    best: float | None = None
    best_metrics: dict[str, Any] | None = None
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start_metrics: dict[str, float] | None = None
    last_metrics: dict[str, float] | None = None
    stopped_early: bool = False
    skipped: dict[str, int] = field(default_factory=dict)  # all processes, at the last save

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


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


def save_rng(folder: Path) -> None:
    """The RNG states as JSON (python, numpy) and safetensors (torch, cuda)."""
    state = rng_state()
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    (folder / RNG_JSON).write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}))
    tensors = {"torch": state["torch"]}
    tensors.update({f"cuda.{i}": t for i, t in enumerate(state.get("cuda", []))})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / RNG_TENSORS)


def load_rng(folder: Path) -> dict[str, Any]:
    """The state saved by save_rng (ConfigError if the files are malformed)."""
    try:
        raw = json.loads((folder / RNG_JSON).read_text())
        tensors = load_file(str(folder / RNG_TENSORS))
        version, internal, gauss = raw["python"]
        kind, keys, pos, has_gauss, cached = raw["numpy"]
        state: dict[str, Any] = {
            "python": (int(version), tuple(int(x) for x in internal), gauss),
            "numpy": (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                      float(cached)),
            "torch": tensors["torch"]}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ConfigError(f"unreadable RNG state ({type(exc).__name__}: {str(exc)[:80]})",
                          file=folder / RNG_JSON) from None
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state


def load_plain(file: Path, map_location: Any = None) -> Any:
    """``torch.load`` that never unpickles code: tensors and plain containers only."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError("refused to load: not plain tensor data (a checkpoint file must "
                          f"not hold code; delete the checkpoint to start over): {first}",
                          file=file) from None


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


def save_weights(path: Path, model: nn.Module, info: dict[str, Any] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """Only the trainable parameters (a frozen base is reloaded from the base model);
    ``weights``: those parameters already gathered (`trainable_state`, under FSDP)."""
    path = Path(path)
    tmp = _tmp_dir(path)
    weights = trainable_state(model) if weights is None else weights
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    (tmp / STATE).write_text(json.dumps(info or {}, indent=1, default=str))
    _swap_in(tmp, path)


def load_weights(path: Path, model: nn.Module) -> dict[str, Any]:
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise ConfigError("no weights in checkpoint folder", file=path)
    load_trainable_state(model, load_file(str(path / WEIGHTS)))
    return json.loads((path / STATE).read_text()) if (path / STATE).is_file() else {}


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: Any, scheduler: Any,
                    scaler: Any | None, state: dict[str, Any],
                    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
                    ) -> None:
    """Everything needed to continue exactly where training stopped. ``gathered``: the
    weights and optimizer state already gathered by every process (under FSDP)."""
    path = Path(path)
    tmp = _tmp_dir(path)
    weights, optim = gathered or (trainable_state(model), optimizer_state(optimizer))
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    torch.save(optim, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    save_rng(tmp)
    (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
    _swap_in(tmp, path, previous_of(path))


def gathered(model: nn.Module, optimizer: Any | None, keep: bool
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Under FSDP: the whole trainable weights and optimizer state (none without an
    optimizer), gathered by every process, kept by the main one (``keep``; None elsewhere)."""
    weights = trainable_state(model, keep=keep)
    optim = optimizer_state(optimizer, keep=keep) if optimizer is not None else {}
    return (weights, optim) if keep else None


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
    needed = [WEIGHTS, "optimizer.pt", "scheduler.pt", RNG_JSON, RNG_TENSORS, STATE]
    absent = [n for n in needed if not (path / n).is_file()]
    if absent:
        old = " (written by an older medsig with a pickled rng.pt, which is not loaded: " \
              "start over without --resume)" if (path / "rng.pt").is_file() else ""
        raise ConfigError(f"incomplete checkpoint (missing {', '.join(absent)}){old}",
                          file=path)
    device = next(model.parameters()).device
    optim_state = load_plain(path / "optimizer.pt", device)
    sched_state = load_plain(path / "scheduler.pt")
    scaler_state = load_plain(path / "scaler.pt") \
        if scaler is not None and (path / "scaler.pt").is_file() else None
    rng = load_rng(path)
    load_trainable_state(model, load_file(str(path / WEIGHTS)))
    load_optimizer_state(optimizer, optim_state)
    scheduler.load_state_dict(sched_state)
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    set_rng_state(rng)
    return json.loads((path / STATE).read_text())
