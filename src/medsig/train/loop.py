"""The one training loop (accelerate): objectives plug in, everything else is shared.

Mixed precision (bf16 where the GPU has it, fp16 with loss scaling otherwise, fp32 on CPU),
gradient accumulation, AdamW + cosine schedule with warm-up, clipping, checkpoints every
epoch / N steps with exact resume, validation, best-checkpoint selection, early stopping,
CSV + TensorBoard logs, and the output folder of the "Training outputs" contract.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medsig.errors import ConfigError, MedsigError
from medsig.train import checkpoint as ckpt
from medsig.train.config import TrainConfig, dump_config, load_config
from medsig.train.data import (
    Batch,
    PersistentLoader,
    RowImages,
    TrainData,
    epoch_pool,
    eval_batches,
    load_train_data,
    loader_workers,
    micro_batches,
    seed_of,
    spec_fingerprint,
    split_fingerprint,
    training_threads,
)

NO_DECAY = ("bias", "norm", "logit_scale", "logit_bias", "position_embedding", "probe")


class Objective(Protocol):
    """What an objective provides to the loop (ContrastiveObjective, ClassifyObjective)."""

    name: str
    model: nn.Module
    report: Any
    preprocess: Callable[[Any], Tensor]
    image_size: int

    def begin_epoch(self, epoch: int) -> None: ...
    def plan(self, epoch: int, pool: np.ndarray, step_size: int, seed: int,
             plain_train: Callable[[], Iterable[Batch]]) -> list[list[int]]: ...
    def step(self, batches: list[Batch]) -> Tensor: ...
    def evaluate(self, val_batches: Iterable[Batch]) -> dict[str, float]: ...
    def save(self, out_dir: Path, val_batches: Iterable[Batch]) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- accelerate
def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (a new Accelerator may use another precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def resolve_precision(precision: str, cpu: bool) -> str:
    """accelerate's mixed_precision for a config value ('no', 'bf16' or 'fp16')."""
    if precision == "fp32":
        return "no"
    if precision == "auto":
        if cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and cpu:
        raise ConfigError("precision 'fp16' needs a GPU; use fp32 (or bf16) on CPU")
    return precision


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator

    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"'device' must be auto, cpu, cuda or mps, got '{cfg.device}'")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    cpu = cfg.device == "cpu" or (not torch.cuda.is_available() and not
                                  (has_mps and cfg.device in ("auto", "mps")))
    reset_accelerate()
    return Accelerator(cpu=cpu, mixed_precision=resolve_precision(cfg.precision, cpu),
                       step_scheduler_with_optimizer=False)


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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr)


def build_objective(cfg: TrainConfig, data: TrainData, accelerator: Any) -> Objective:
    if cfg.objective == "contrastive":
        from medsig.train.contrastive import ContrastiveObjective

        return ContrastiveObjective(cfg, data, accelerator)
    from medsig.train.classify import ClassifyObjective

    return ClassifyObjective(cfg, data, accelerator)


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


def _say(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        tqdm.write(message)


# ----------------------------------------------------------------------------- training
def train(config: TrainConfig | dict | str | Path, *, overrides: list[str] | dict | None = None,
          resume: bool = False, callback: Callable[[dict[str, Any]], None] | None = None
          ) -> Path:
    """Train per the config; return the output folder (see docs: "Training outputs").

    `resume=True` continues from `OUT/checkpoints/last` exactly (same final weights as an
    uninterrupted run). `callback(info)` is called after every optimizer step.
    """
    cfg = load_config(config, overrides)
    if cfg.objective == "probe":
        try:
            from medsig.train.probe import train_probe
        except ImportError:
            raise ConfigError("objective 'probe' is not available in this build") from None
        return train_probe(cfg)
    with training_threads(cfg.threads, loader_workers(cfg.num_workers), cfg.device):
        return _train(cfg, resume, callback)


def _train(cfg: TrainConfig, resume: bool,
           callback: Callable[[dict[str, Any]], None] | None) -> Path:
    started = time.perf_counter()
    out = Path(cfg.out)
    last, best = out / "checkpoints" / "last", out / "checkpoints" / "best"
    _check_out(out, last, resume)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    data = load_train_data(cfg)
    objective = build_objective(cfg, data, accelerator)
    _say(accelerator, f"medsig train {cfg.objective}: {objective.report}")
    optimizer = make_optimizer(objective.model, cfg)
    _, optimizer = accelerator.prepare(objective.model, optimizer)

    step_size = cfg.optim.batch_size * cfg.optim.grad_accum
    pool0 = epoch_pool(data.train, cfg, data.labels, 0)
    drop_last = cfg.objective == "contrastive"
    per_epoch = (1 if len(pool0) <= step_size else
                 (len(pool0) // step_size if drop_last else math.ceil(len(pool0) / step_size)))
    total = cfg.optim.max_steps or cfg.optim.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio
                                                                     * total), total)
    scaler = accelerator.scaler
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "plan": None, "best": None,
                             "best_metrics": None, "bad_evals": 0, "history": [],
                             "start_metrics": None, "last_metrics": None,
                             "stopped_early": False, "skipped": {}}
    resumed = resume and (last / ckpt.STATE).is_file()
    if resumed:
        state = ckpt.load_checkpoint(last, model=objective.model, optimizer=optimizer,
                                     scheduler=scheduler, scaler=scaler)
        _say(accelerator, f"resumed from {last} at step {state['step']} (epoch "
                          f"{state['epoch'] + 1}, batch {state['batch']})")
    out.mkdir(parents=True, exist_ok=True)
    if resumed:
        _check_same_config(cfg, out / "config.yaml")
    dump_config(cfg, out / "config.yaml")
    log = RunLog(out, state["history"], state["step"] if resumed else None,
                 accelerator.is_main_process)

    size = objective.image_size
    augment = None
    if cfg.data.augment:
        from medsig.data.transforms import Augment

        augment = Augment(size)
    train_ds = RowImages(data.train.image_paths, objective.preprocess, augment, cfg.seed)
    plain_ds = RowImages(data.train.image_paths, objective.preprocess)
    val_ds = RowImages(data.val.image_paths, objective.preprocess)
    eval_bs = max(cfg.optim.batch_size, 32)
    workers = loader_workers(cfg.num_workers)
    # worker processes start once per run (not per epoch): persistent loaders
    train_loader = PersistentLoader(train_ds, workers, seed_of(cfg.seed, "loader") % 2**63,
                                    cfg.prefetch)
    val_loader = PersistentLoader(val_ds, workers, prefetch=cfg.prefetch)
    plain_loader = PersistentLoader(plain_ds, workers, prefetch=cfg.prefetch)

    def val_batches() -> Iterable[Batch]:
        return _count_skips(val_loader(eval_batches(len(val_ds), eval_bs)), state, "val")

    def plain_train() -> Iterable[Batch]:
        return plain_loader(eval_batches(len(plain_ds), eval_bs))

    metric, mode = cfg.metric, cfg.mode

    def run_eval(epoch: int, candidate: bool = True) -> None:
        """Validate; a candidate evaluation may become the best checkpoint (the baseline
        before training is logged for comparison only)."""
        metrics = objective.evaluate(val_batches())
        if metric not in metrics:
            raise ConfigError(f"eval.best_metric '{metric}' is not computed by objective "
                              f"'{cfg.objective}' (available: {', '.join(sorted(metrics))})")
        log.add({"step": state["step"], "epoch": epoch, **metrics})
        state["last_metrics"] = metrics
        value = metrics[metric]
        better = candidate and (not math.isnan(value)) and (state["best"] is None or (
            value > state["best"] if mode == "max" else value < state["best"]))
        if better:
            state.update(best=value, best_metrics={**metrics, "step": state["step"],
                                                   "epoch": epoch}, bad_evals=0)
            if accelerator.is_main_process:
                ckpt.save_weights(best, objective.model, state["best_metrics"])
        elif candidate:
            state["bad_evals"] += 1
        _say(accelerator, f"eval step {state['step']}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items()) + (" (best)" if better else ""))

    def save_last() -> None:
        log.flush()
        if accelerator.is_main_process:
            ckpt.save_checkpoint(last, model=objective.model, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, state=state)

    if not resumed and cfg.eval.at_start:
        run_eval(0, candidate=False)
        state["start_metrics"] = state["last_metrics"]
    objective.model.train()
    params = [p for p in objective.model.parameters() if p.requires_grad]
    try:
        for epoch in range(state["epoch"], epochs):
            if state["step"] >= total or state["stopped_early"]:
                break
            objective.begin_epoch(epoch)
            if state["plan"] is None:
                pool = epoch_pool(data.train, cfg, data.labels, epoch)
                state["plan"] = objective.plan(epoch, pool, step_size,
                                               seed_of(cfg.seed, "order", epoch), plain_train)
                state["batch"] = 0
            plan: list[list[int]] = state["plan"]
            steps = [micro_batches(s, cfg.optim.batch_size) for s in plan[state["batch"]:]]
            loader = iter(_count_skips(train_loader(
                [[(epoch, r) for r in m] for ms in steps for m in ms]), state, "train"))
            bar = tqdm(total=len(plan), initial=state["batch"], desc=f"epoch {epoch + 1}/"
                       f"{epochs}", disable=not accelerator.is_main_process, leave=False)
            try:
                for ms in steps:
                    if state["step"] >= total:
                        break
                    batches = [b for b in (next(loader) for _ in ms) if b.rows]
                    state["batch"] += 1
                    bar.update(1)
                    if not batches:
                        continue
                    loss = float(objective.step(batches))
                    if not math.isfinite(loss):
                        good = ckpt.roll_back(last, state["step"])
                        kept = (f"the last good checkpoint (step {good}) is kept in {last}"
                                if good is not None else "no good checkpoint had been written")
                        raise ConfigError(f"the loss became {loss} at step {state['step'] + 1} "
                                          f"(epoch {epoch + 1}); training stopped, {kept} - lower "
                                          "optim.lr or check the data", file=cfg.source)
                    if cfg.optim.grad_clip is not None:
                        accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    lr = float(scheduler.get_last_lr()[0])
                    log.add({"step": state["step"], "epoch": epoch + 1, "train/loss": loss,
                             "train/lr": lr})
                    bar.set_postfix(loss=f"{loss:.4f}")
                    every = cfg.eval.save_every_steps
                    if every and state["step"] % every == 0 and state["batch"] < len(plan):
                        save_last()
                    if callback is not None:
                        callback({"step": state["step"], "epoch": epoch + 1, "loss": loss,
                                  "lr": lr, "out": out})
            finally:
                bar.close()
                train_loader.stop()
            finished_epoch = state["batch"] >= len(plan)
            if finished_epoch:
                state.update(epoch=epoch + 1, plan=None, batch=0)
            if (finished_epoch and (epoch + 1) % cfg.eval.eval_every == 0) \
                    or state["step"] >= total:
                run_eval(epoch + 1)
                patience = cfg.eval.patience
                if patience is not None and state["bad_evals"] >= patience:
                    state["stopped_early"] = True
                    _say(accelerator, f"early stopping: no improvement of {metric} in "
                                      f"{patience} evaluation(s)")
            save_last()
        if state["last_metrics"] is None or state["history"][-1].get(metric) is None:
            run_eval(state["epoch"])
            save_last()
        seconds = time.perf_counter() - started
        return _finish(cfg, data, objective, accelerator, state, val_batches, best, out,
                       seconds, total)
    finally:
        log.close()
        for loader in (train_loader, val_loader, plain_loader):
            loader.stop()


def _count_skips(batches: Iterable[Batch], state: dict[str, Any], where: str
                 ) -> Iterable[Batch]:
    for b in batches:
        for _, reason in b.skipped:
            key = f"{where}/{reason}"
            state["skipped"][key] = state["skipped"].get(key, 0) + 1
        yield b


RESUME_MAY_CHANGE = ("optim.epochs", "optim.max_steps", "eval.patience", "num_workers",
                     "threads", "prefetch", "device", "out", "eval.at_start")


def _check_same_config(cfg: TrainConfig, saved: Path) -> None:
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


def _check_out(out: Path, last: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError("'out' exists and is not a folder", file=out)
    if resume or not out.is_dir():
        return
    if (out / "medsig.json").exists() or last.exists():
        raise ConfigError("the output folder already holds a training run; resume it "
                          "(--resume) or choose another 'out'", file=out)


def _finish(cfg: TrainConfig, data: TrainData, objective: Objective, accelerator: Any,
            state: dict[str, Any], val_batches: Callable[[], Iterable[Batch]], best: Path,
            out: Path, seconds: float, total: int) -> Path:
    """Load the best weights, save the model, medsig.json and the model card."""
    from medsig import __version__
    from medsig.train.card import write_card

    if (best / ckpt.WEIGHTS).is_file():
        ckpt.load_weights(best, objective.model)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out
    extras = objective.save(out, val_batches())
    spec = data.collection.spec
    info = {
        "medsig_version": __version__, "objective": cfg.objective, "base_model": cfg.model,
        "encoder": ".", "preprocess": getattr(objective.preprocess, "mode", cfg.preprocess),
        "image_size": extras["image_size"],
        "spec": {"name": spec.name, "path": str(spec.path),
                 "fingerprint": spec_fingerprint(data.collection)},
        "split": {"fingerprint": split_fingerprint(data.collection), "counts": data.counts},
        "labels": data.labels, "heads": extras["heads"], "prompts": extras["prompts"],
        "config": cfg.to_dict(),
        "metrics": {"start": state["start_metrics"], "val": state["best_metrics"],
                    "last": state["last_metrics"],
                    "best": {"metric": cfg.metric, "mode": cfg.mode, "value": state["best"],
                             "step": (state["best_metrics"] or {}).get("step")}},
        "training": {"steps": state["step"], "planned_steps": total,
                     "stopped_early": state["stopped_early"], "seconds": round(seconds, 2),
                     "precision": {"no": "fp32"}.get(str(accelerator.mixed_precision),
                                                     str(accelerator.mixed_precision)),
                     "device": str(accelerator.device), "skipped_images": state["skipped"],
                     "adapt": objective.report.to_dict()},
        "history": "log.csv",
    }
    text = json.dumps(_clean(info), indent=2, default=_json_default, allow_nan=False)
    (out / "medsig.json").write_text(text + "\n")
    write_card(out, info)
    _say(accelerator, f"saved {out} ({state['step']} steps, {seconds:.1f} s)")
    if cfg.blend:  # WiSE-FT blends with the starting model (medsig.models.blend)
        from medsig.models.blend import blend

        blend(cfg.model, out, [float(a) for a in cfg.blend], out / "blend")
    return out


def _clean(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["MedsigError", "Objective", "make_accelerator", "reset_accelerate",
           "resolve_precision", "train"]
