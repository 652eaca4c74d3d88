"""The one training loop (accelerate): objectives plug in, everything else is shared.

Mixed precision (bf16 where the GPU has it, fp16 with loss scaling otherwise, fp32 on CPU),
gradient accumulation, AdamW + cosine schedule with warm-up, clipping, checkpoints every
epoch / N steps with exact resume, validation, best-checkpoint selection, early stopping,
CSV + TensorBoard logs, and the output folder of the "Training outputs" contract.
Data-parallel over several processes (DDP through accelerate, or FSDP from an accelerate
config: medsig.train.fsdp): docs/scaling.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medsig.errors import ConfigError, MedsigError
from medsig.progress import progress_bar
from medsig.train import checkpoint as ckpt
from medsig.train.adapt import full_state_dict
from medsig.train.checkpoint import TrainState
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
    shard,
    training_threads,
)
from medsig.train.distributed import broadcast, is_sharded, merge_counters, sum_counts, world
from medsig.train.fsdp import reshard, sync_replicated
from medsig.train.metrics_log import StepLosses
from medsig.train.runtime import (
    RunLog,
    check_out,
    check_same_config,
    make_accelerator,
    prepare,
    reset_accelerate,
)


class Objective(Protocol):
    """What an objective provides to the loop (ContrastiveObjective, ClassifyObjective)."""

    name: str
    model: nn.Module  # the adapted model (what is saved)
    net: nn.Module  # the module trained through (prepared: DDP-wrapped or FSDP-sharded)
    find_unused_parameters: bool  # DDP: some trainable parameter may get no gradient
    report: Any
    preprocess: Callable[[Any], Tensor]
    image_size: int

    def begin_epoch(self, epoch: int) -> None: ...
    def plan(self, epoch: int, pool: np.ndarray, step_size: int, seed: int,
             plain_train: Callable[[], Iterable[Batch]]) -> list[list[int]]: ...
    # every process calls these with its own rows; results are those of the global batch /
    # of every val row (gathered), equal on every process; files come from the main process
    def step(self, batches: list[Batch]) -> Tensor: ...
    def evaluate(self, val_batches: Iterable[Batch]) -> dict[str, float]: ...
    # state_dict: the model's whole weights under FSDP (main process), else None
    def save(self, out_dir: Path, val_batches: Iterable[Batch],
             state_dict: dict[str, Tensor] | None = None) -> dict[str, Any]: ...


def build_objective(cfg: TrainConfig, data: TrainData, accelerator: Any) -> Objective:
    if cfg.objective == "contrastive":
        from medsig.train.contrastive import ContrastiveObjective

        return ContrastiveObjective(cfg, data, accelerator)
    from medsig.train.classify import ClassifyObjective

    return ClassifyObjective(cfg, data, accelerator)


def _say(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        tqdm.write(message)


# ----------------------------------------------------------------------------- training
def train(config: TrainConfig | dict | str | Path, *, overrides: list[str] | dict | None = None,
          resume: bool = False, callback: Callable[[dict[str, Any]], None] | None = None
          ) -> Path:
    """Train per the config; return the output folder (see docs: "Training outputs").

    `resume=True` continues from `OUT/checkpoints/last` exactly (same final weights as an
    uninterrupted run). `callback(info)` is called after every optimizer step. Under
    `accelerate launch` / `torchrun` every process runs this (docs/scaling.md).
    """
    cfg = load_config(config, overrides)
    if cfg.objective == "probe":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("objective 'probe' trains in one process (seconds on a CPU): "
                              "run it without accelerate launch / torchrun")
        try:
            from medsig.train.probe import train_probe
        except ImportError:
            raise ConfigError("objective 'probe' is not available in this build") from None
        return train_probe(cfg)
    with training_threads(cfg.threads, loader_workers(cfg.num_workers), cfg.device):
        return Trainer(cfg, resume, callback).run()


class Trainer:
    """One run: set-up, the epochs, evaluation, checkpoints and the final save.

    Several processes (DDP): each loads its contiguous slice of every global micro-batch
    (`optim.batch_size` is the global batch), objectives compute their loss on the global
    batch, and every decision (plan, best checkpoint, early stopping) is taken from values
    that are equal on every process; files are written by the main process.
    """

    def __init__(self, cfg: TrainConfig, resume: bool,
                 callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.started = time.perf_counter()
        self.cfg, self.callback = cfg, callback
        self.out = Path(cfg.out)
        self.last = self.out / "checkpoints" / "last"
        self.best_dir = self.out / "checkpoints" / "best"
        check_out(self.out, self.last, resume)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.accelerator = acc = make_accelerator(cfg)
        self.rank, self.world = world()
        self.data = load_train_data(cfg)
        self.objective = build_objective(cfg, self.data, acc)
        self.say(f"medsig train {cfg.objective}: {self.objective.report}"
                 + (f" ({self.world} processes)" if self.world > 1 else ""))
        self.objective.net, self.optimizer = prepare(
            acc, cfg, self.objective.model, self.objective.net,
            self.objective.find_unused_parameters)
        self.sharded = is_sharded(self.objective.net)  # FSDP: medsig.train.fsdp
        if self.sharded and min(len(self.data.val), len(self.data.train)) < self.world:
            raise ConfigError(f"FSDP over {self.world} processes needs at least {self.world} "
                              "train and val rows (every process runs every forward)")
        self._schedule()
        self.state = TrainState()
        self.resumed = resume and (self.last / ckpt.STATE).is_file()
        if self.resumed:
            self._load_last()
        self._write_config()
        self.base_skipped = dict(self.state.skipped)
        self.local_skipped: dict[str, int] = {}
        self.log = RunLog(self.out, self.state.history,
                          self.state.step if self.resumed else None, acc.is_main_process)
        self.losses = StepLosses(acc.device)
        self._loaders()

    # -- set-up ----------------------------------------------------------------------------
    def say(self, message: str) -> None:
        _say(self.accelerator, message)

    def _schedule(self) -> None:
        """Steps per epoch, total steps and the cosine schedule."""
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.cfg
        self.step_size = cfg.optim.batch_size * cfg.optim.grad_accum
        pool0 = epoch_pool(self.data.train, cfg, self.data.labels, 0)
        drop_last = cfg.objective == "contrastive"
        size = self.step_size
        self.per_epoch = (1 if len(pool0) <= size else
                          (len(pool0) // size if drop_last else math.ceil(len(pool0) / size)))
        self.total = cfg.optim.max_steps or cfg.optim.epochs * self.per_epoch
        self.epochs = math.ceil(self.total / self.per_epoch)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(cfg.optim.warmup_ratio * self.total), self.total)

    def _load_last(self) -> None:
        raw = ckpt.load_checkpoint(self.last, model=self.objective.model,
                                   optimizer=self.optimizer, scheduler=self.scheduler,
                                   scaler=self.accelerator.scaler)
        self.state = TrainState.from_dict(raw)
        s = self.state
        self.say(f"resumed from {self.last} at step {s.step} (epoch {s.epoch + 1}, batch "
                 f"{s.batch})")

    def _write_config(self) -> None:
        """config.yaml, after every process compared it with the run being resumed."""
        acc = self.accelerator
        if self.resumed:
            check_same_config(self.cfg, self.out / "config.yaml")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
        acc.wait_for_everyone()

    def _loaders(self) -> None:
        """Persistent loaders (worker processes start once per run, not per epoch)."""
        cfg, objective = self.cfg, self.objective
        augment = None
        if cfg.data.augment:
            from medsig.data.transforms import Augment

            augment = Augment(objective.image_size,  # NaFlex: the crop's aspect ratio kept
                              keep_aspect=getattr(objective.preprocess, "keeps_aspect", False))
        paths = self.data.train.image_paths
        workers = loader_workers(cfg.num_workers)
        self.train_loader = PersistentLoader(
            RowImages(paths, objective.preprocess, augment, cfg.seed), workers,
            seed_of(cfg.seed, "loader") % 2**63, cfg.prefetch)
        self.val_loader = PersistentLoader(RowImages(self.data.val.image_paths,
                                                     objective.preprocess), workers,
                                           prefetch=cfg.prefetch)
        self.plain_loader = PersistentLoader(RowImages(paths, objective.preprocess), workers,
                                             prefetch=cfg.prefetch)
        self.eval_bs = max(cfg.optim.batch_size, 32)

    # -- data ------------------------------------------------------------------------------
    def _count_skips(self, batches: Iterable[Batch], where: str) -> Iterable[Batch]:
        for b in batches:
            for _, reason in ([] if b.ghost else b.skipped):
                key = f"{where}/{reason}"
                self.local_skipped[key] = self.local_skipped.get(key, 0) + 1
            yield b

    def _my_rows(self, n: int) -> list[list[int]]:
        """This process's contiguous share of rows 0..n-1, in evaluation batches (under
        FSDP the same number of batches on every process)."""
        return eval_batches(n, self.eval_bs, self.rank, self.world, lockstep=self.sharded)

    def val_batches(self) -> Iterable[Batch]:
        """This process's val rows (each val row is read by one process)."""
        return self._count_skips(self.val_loader(self._my_rows(len(self.data.val))), "val")

    def plain_train(self) -> Iterable[Batch]:
        return self.plain_loader(self._my_rows(len(self.data.train)))

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's global step batches: derived from the seed, equal on every process
        (rank 0's plan is sent to all, so even float ties cannot make them differ)."""
        pool = epoch_pool(self.data.train, self.cfg, self.data.labels, epoch)
        plan = self.objective.plan(epoch, pool, self.step_size,
                                   seed_of(self.cfg.seed, "order", epoch), self.plain_train)
        reshard(self.objective.net)  # FSDP: hard-negative mining embedded the rows
        return broadcast(plan)

    def _my_slice(self, micro_batch: list[int]) -> tuple[list[int], bool]:
        """This process's rows of a global micro-batch, or (first row, ghost) when none."""
        mine = shard(micro_batch, self.rank, self.world)
        return (mine, False) if mine else (micro_batch[:1], True)

    def _local_steps(self, epoch: int, plan: list[list[int]]) -> Iterator[list[Batch]]:
        """Per remaining step batch of the plan: this process's slice of each micro-batch,
        loaded (a ghost row where the slice is empty)."""
        steps = [[self._my_slice(m) for m in micro_batches(s, self.cfg.optim.batch_size)]
                 for s in plan[self.state.batch:]]
        slices = [sl for ms in steps for sl in ms]

        def marked(batches: Iterable[Batch]) -> Iterator[Batch]:
            for b, (_, ghost) in zip(batches, slices):
                b.ghost = ghost
                yield b

        keys = [[(epoch, r) for r in rows] for rows, _ in slices]
        loaded = iter(self._count_skips(marked(self.train_loader(keys)), "train"))
        for ms in steps:
            yield [next(loaded) for _ in ms]

    def _kept(self, batches: list[Batch]) -> list[Batch]:
        """The micro-batches with a row on some process (all images unreadable: dropped)."""
        if self.world == 1:
            return [b for b in batches if b.rows]
        counts = sum_counts(torch.tensor([0 if b.ghost else len(b.rows) for b in batches],
                                         device=self.accelerator.device))
        kept = [b for b, n in zip(batches, counts.tolist()) if n > 0]
        if any(not b.rows for b in kept):
            raise MedsigError("a process's whole share of a training batch was unreadable "
                              "under several processes; fix or drop the unreadable images")
        return kept
    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Path:
        state = self.state
        try:
            if not self.resumed and self.cfg.eval.at_start:
                self.run_eval(0, candidate=False)
                state.start_metrics = state.last_metrics
            self.objective.model.train()
            for epoch in range(state.epoch, self.epochs):
                if state.step >= self.total or state.stopped_early:
                    break
                self._epoch(epoch)
                self._after_epoch(epoch)
            if state.last_metrics is None or state.history[-1].get(self.cfg.metric) is None:
                self.run_eval(state.epoch)
                self.save_last()
            seconds = time.perf_counter() - self.started
            self.state.skipped = self._skipped()
            return _finish(self.cfg, self.data, self.objective, self.accelerator, state,
                           self.val_batches, self.best_dir, self.out, seconds, self.total)
        finally:
            self.log.close()
            for loader in (self.train_loader, self.val_loader, self.plain_loader):
                loader.stop()

    def _epoch(self, epoch: int) -> None:
        """The remaining step batches of one epoch."""
        state = self.state
        self.objective.begin_epoch(epoch)
        if state.plan is None:
            state.plan = self._epoch_plan(epoch)
            state.batch = 0
        plan = state.plan
        bar = progress_bar(len(plan), f"epoch {epoch + 1}/{self.epochs}", "step", state.batch,
                           disable=not self.accelerator.is_main_process)
        try:
            for batches in self._local_steps(epoch, plan):
                if state.step >= self.total:
                    break
                state.batch += 1
                bar.update(1)
                batches = self._kept(batches)
                if not batches:
                    continue
                loss = self.objective.step(batches)  # on the device: read in read_losses
                self._optimizer_step(loss, epoch, bar)
        finally:
            bar.close()
            self.train_loader.stop()

    def _optimizer_step(self, loss: Tensor, epoch: int, bar: Any) -> None:
        """Clip, step, schedule, log (the loss is read every few steps, see StepLosses);
        a checkpoint every `eval.save_every_steps`."""
        state, acc, cfg = self.state, self.accelerator, self.cfg
        sync_replicated(self.objective.net)
        if cfg.optim.grad_clip is not None:
            acc.clip_grad_norm_(self.objective.net.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        lr = float(self.scheduler.get_last_lr()[0])
        self.losses.add({"step": state.step, "epoch": epoch + 1, "train/loss": None,
                         "train/lr": lr}, loss)
        every = cfg.eval.save_every_steps
        if every and state.step % every == 0 and state.batch < len(state.plan or []):
            self.save_last()
        elif self.losses.due() and (value := self.read_losses()) is not None:
            bar.set_postfix(loss=f"{value:.4f}")
        if self.callback is not None:
            self.callback({"step": state.step, "epoch": epoch + 1, "loss": loss, "lr": lr,
                           "out": self.out})

    def read_losses(self) -> float | None:
        """The queued step losses into the log (one host sync); a non-finite one stops."""
        return self.losses.flush(self.log.add, self._diverged)

    def _diverged(self, row: dict[str, Any], loss: float) -> None:
        """A non-finite loss (equal on every process) in the logged `row`: keep the last good
        checkpoint, stop."""
        main = self.accelerator.is_main_process
        step = row["step"]  # the weights of step - 1 gave this loss
        good = broadcast(ckpt.roll_back(self.last, step - 1) if main else None)
        kept = (f"the last good checkpoint (step {good}) is kept in {self.last}"
                if good is not None else "no good checkpoint had been written")
        raise ConfigError(f"the loss became {loss} at step {step} (epoch {row['epoch']}); "
                          f"training stopped, {kept} - lower optim.lr or check the data",
                          file=self.cfg.source)

    def _after_epoch(self, epoch: int) -> None:
        """Close a finished epoch, evaluate when due, early stopping, checkpoint."""
        state, cfg = self.state, self.cfg
        finished_epoch = state.batch >= len(state.plan or [])
        if finished_epoch:
            state.epoch, state.plan, state.batch = epoch + 1, None, 0
        if (finished_epoch and (epoch + 1) % cfg.eval.eval_every == 0) \
                or state.step >= self.total:
            self.run_eval(epoch + 1)
            patience = cfg.eval.patience
            if patience is not None and state.bad_evals >= patience:
                state.stopped_early = True
                self.say(f"early stopping: no improvement of {cfg.metric} in {patience} "
                         "evaluation(s)")
        self.save_last()

    def run_eval(self, epoch: int, candidate: bool = True) -> None:
        """Validate (predictions of every process); a candidate evaluation may become the
        best checkpoint (the baseline before training is logged for comparison only)."""
        state, cfg = self.state, self.cfg
        self.read_losses()
        metrics = self.objective.evaluate(self.val_batches())
        reshard(self.objective.net)  # FSDP: shards again before weights are read
        if cfg.metric not in metrics:
            raise ConfigError(f"eval.best_metric '{cfg.metric}' is not computed by objective "
                              f"'{cfg.objective}' (available: {', '.join(sorted(metrics))})")
        self.log.add({"step": state.step, "epoch": epoch, **metrics})
        state.last_metrics = metrics
        value = metrics[cfg.metric]
        better = candidate and (not math.isnan(value)) and (state.best is None or (
            value > state.best if cfg.mode == "max" else value < state.best))
        if better:
            state.best, state.bad_evals = value, 0
            state.best_metrics = {**metrics, "step": state.step, "epoch": epoch}
            main = self.accelerator.is_main_process
            weights = ckpt.gathered(self.objective.model, None, main) if self.sharded else None
            if main:
                ckpt.save_weights(self.best_dir, self.objective.model, state.best_metrics,
                                  weights=weights[0] if weights else None)
        elif candidate:
            state.bad_evals += 1
        self.say(f"eval step {state.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items()) + (" (best)" if better else ""))

    def _skipped(self) -> dict[str, int]:
        """Unreadable images of every process since the start (or the resumed checkpoint)."""
        total = dict(self.base_skipped)
        for k, v in merge_counters(self.local_skipped).items():
            total[k] = total.get(k, 0) + v
        return total

    def save_last(self) -> None:
        """The resumable checkpoint (main process; every process calls it)."""
        self.read_losses()
        self.state.skipped = self._skipped()
        self.log.flush()
        main = self.accelerator.is_main_process
        gathered = ckpt.gathered(self.objective.model, self.optimizer, main) \
            if self.sharded else None  # FSDP: every process takes part
        if main:
            ckpt.save_checkpoint(self.last, model=self.objective.model,
                                 optimizer=self.optimizer, scheduler=self.scheduler,
                                 scaler=self.accelerator.scaler, state=self.state.to_dict(),
                                 gathered=gathered)


def _finish(cfg: TrainConfig, data: TrainData, objective: Objective, accelerator: Any,
            state: TrainState, val_batches: Callable[[], Iterable[Batch]], best: Path,
            out: Path, seconds: float, total: int) -> Path:
    """Load the best weights, save the model, medsig.json and the model card (the main
    process writes; every process takes part in the final validation pass)."""
    from medsig.train.output import build_artifact, write_outputs

    accelerator.wait_for_everyone()  # the main process has written the best weights
    reshard(objective.net)
    if (best / ckpt.WEIGHTS).is_file():
        ckpt.load_weights(best, objective.model)
    whole = full_state_dict(objective.model, keep=accelerator.is_main_process) \
        if is_sharded(objective.model) else None  # FSDP: gathered by every process
    extras = objective.save(out, val_batches(), whole)
    if not accelerator.is_main_process:
        return out
    metrics = {"start": state.start_metrics, "val": state.best_metrics,
               "last": state.last_metrics,
               "best": {"metric": cfg.metric, "mode": cfg.mode, "value": state.best,
                        "step": (state.best_metrics or {}).get("step")}}
    training = {"steps": state.step, "planned_steps": total,
                "stopped_early": state.stopped_early, "seconds": round(seconds, 2),
                "precision": {"no": "fp32"}.get(str(accelerator.mixed_precision),
                                                str(accelerator.mixed_precision)),
                "device": str(accelerator.device), "skipped_images": state.skipped,
                "adapt": objective.report.to_dict(),
                "processes": accelerator.num_processes,
                "sharded": is_sharded(objective.model)}  # FSDP
    write_outputs(out, build_artifact(cfg, out, data.collection, data.counts, extras["heads"],
                                      objective.preprocess, prompts=extras["prompts"],
                                      metrics=metrics, training=training))
    if cfg.eval.safe_outputs and extras["heads"]:  # medsig.train.safety
        from medsig.train.safety import fit_safety

        fit_safety(out, cfg.spec, cfg.eval.alpha, cfg.eval.ood_false_reject, cfg.seed,
                   cfg.optim.batch_size, str(accelerator.device))
    _say(accelerator, f"saved {out} ({state.step} steps, {seconds:.1f} s)")
    if cfg.blend:  # WiSE-FT blends with the starting model (medsig.models.blend)
        from medsig.models.blend import blend

        blend(cfg.model, out, [float(a) for a in cfg.blend], out / "blend")
    return out


__all__ = ["MedsigError", "Objective", "make_accelerator", "reset_accelerate",
           "train"]
