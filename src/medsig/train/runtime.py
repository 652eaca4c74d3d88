"""What a training run needs around the loop: the Accelerator, the optimizer, the run log
(log.csv + TensorBoard) and the checks before starting or resuming a run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsig.errors import ConfigError
from medsig.models.device import select_device, training_precision
from medsig.train.config import TrainConfig, load_config
from medsig.train.fsdp import check_supported, fsdp_requested, fsdp_settings, shard
from medsig.train.optim import adamw

# accelerate's distributed types whose parameters stay whole on every process (DDP)
UNSHARDED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU",
             "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU", "MULTI_NEURON")
NO_DECAY = ("bias", "norm", "logit_scale", "logit_bias", "position_embedding", "probe")


# ----------------------------------------------------------------------------- accelerate
def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (a new Accelerator may use another precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_accelerator(cfg: TrainConfig) -> Any:
    """The run's Accelerator; under `accelerate launch` / `torchrun` one per process (DDP,
    or FSDP with an accelerate FSDP config)."""
    from accelerate import Accelerator

    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"'device' must be auto, cpu, cuda or mps, got '{cfg.device}'")
    device = select_device(cfg.device)  # one owner of the device choice (models/device.py)
    reset_accelerate()
    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision=training_precision(cfg.precision, device),
                              step_scheduler_with_optimizer=False)
    kind = accelerator.distributed_type.value
    if kind not in UNSHARDED and not fsdp_requested(accelerator):
        raise ConfigError(f"accelerate '{kind}' is not supported: use DDP (accelerate launch "
                          "--multi_gpu, or torchrun) or FSDP (an accelerate config with "
                          "distributed_type: FSDP), see docs/scaling.md")
    return accelerator


def prepare(accelerator: Any, cfg: TrainConfig, model: nn.Module, net: nn.Module,
            find_unused_parameters: bool) -> tuple[nn.Module, Any]:
    """The trained module and its optimizer: DDP-wrapped by accelerate's prepare, or, under
    an FSDP launch, sharded (medsig.train.fsdp) and then given a new optimizer over the
    shards. ``model`` is the adapted model inside ``net`` (what the optimizer trains)."""
    from accelerate.utils import DistributedDataParallelKwargs

    settings = fsdp_settings(accelerator)
    if settings is not None:
        check_supported(cfg, accelerator.mixed_precision)
        net = shard(net, model, settings, accelerator.device)
        return net, make_optimizer(model, cfg)
    accelerator.ddp_handler = DistributedDataParallelKwargs(
        find_unused_parameters=find_unused_parameters)
    return accelerator.prepare(net, make_optimizer(model, cfg))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, logit scale / bias and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or any(k in name.lower() for k in NO_DECAY)
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return adamw([g for g in groups if g["params"]], lr=cfg.optim.lr)


# ----------------------------------------------------------------------------- logging
class RunLog:
    """log.csv (rewritten from the history) and TensorBoard scalars."""

    def __init__(self, out: Path, history: list[dict[str, Any]], purge_step: int | None,
                 enabled: bool) -> None:
        self.path, self.history, self.enabled = out / "log.csv", history, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def add(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        columns: list[str] = []
        for row in self.history:
            columns.extend(k for k in row if k not in columns)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        tmp.replace(self.path)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


RESUME_MAY_CHANGE = ("optim.epochs", "optim.max_steps", "eval.patience", "num_workers",
                     "threads", "prefetch", "device", "out", "eval.at_start")


def check_same_config(cfg: TrainConfig, saved: Path) -> None:
    """Resuming with other settings would not continue the same run: refuse, naming the key."""
    if not saved.is_file():
        return
    old = _flat(load_config(saved).to_dict())
    for key, value in _flat(cfg.to_dict()).items():
        if key not in RESUME_MAY_CHANGE and old.get(key) != value:
            raise ConfigError(f"cannot resume with a different '{key}' ({old.get(key)!r} -> "
                              f"{value!r}); use the run's config.yaml or another 'out'",
                              file=saved)


def _flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k not in ("thresholds", "oversample"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_out(out: Path, last: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError("'out' exists and is not a folder", file=out)
    if resume or not out.is_dir():
        return
    if (out / "medsig.json").exists() or last.exists():
        raise ConfigError("the output folder already holds a training run; resume it "
                          "(--resume) or choose another 'out'", file=out)
