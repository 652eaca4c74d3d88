"""Classify objective: label heads on the vision tower, saved as a plain transformers
`AutoModelForImageClassification` whose logits concatenate every head.

Binary heads have 1 output, multilabel C (both: masked BCE with pos_weight from the train
split; MISSING (-1) contributes nothing), multiclass C (cross-entropy, ignore_index=-1).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medsig.data.collection import Collection
from medsig.data.patches import model_inputs
from medsig.errors import ConfigError
from medsig.metrics.classification import roc_auc
from medsig.models.encoder import resolve_cached
from medsig.models.families import family_of, family_preprocess, read_record, write_record
from medsig.models.heads import Head, head_probabilities, heads_for
from medsig.train.adapt import adapt_model, export_model
from medsig.train.config import TrainConfig
from medsig.train.data import Batch, TrainData, step_batches
from medsig.train.distributed import gather_rows, global_batch, no_sync_unless
from medsig.train.losses import masked_bce_loss, pos_weight_from_targets


def build_heads(collection: Collection, labels: list[str]) -> list[Head]:
    """The heads of ``labels`` (one after another), ConfigError for a label without class."""
    for name in labels:
        if not collection.labels[name].classes:
            raise ConfigError(f"label '{name}' has no class to classify")
    return heads_for(collection.labels[name] for name in labels)


def bce_targets(collection: Collection, heads: list[Head]) -> tuple[np.ndarray, list[int]]:
    """(n, K) float targets of the binary / multilabel outputs (-1 missing), their columns."""
    parts, cols = [], []
    for h in heads:
        if h.kind == "multiclass":
            continue
        t = collection.labels[h.name].targets.astype(np.float32)
        parts.append(t[:, None] if h.kind == "binary" else t)
        cols.extend(range(h.offset, h.offset + h.size))
    n = len(collection)
    return (np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)), cols


def load_classifier(name: str, heads: list[Head]) -> Any:
    """AutoModelForImageClassification from a base checkpoint, vision weights copied in."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    outputs = [o for h in heads for o in h.outputs]
    multi = any(h.kind != "multiclass" for h in heads)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            resolve_cached(name), num_labels=len(outputs), id2label=dict(enumerate(outputs)),
            label2id={o: i for i, o in enumerate(outputs)}, ignore_mismatched_sizes=True,
            problem_type="multi_label_classification" if multi
            else "single_label_classification", output_loading_info=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"'{name}' cannot be loaded as an image classifier: "
                          f"{str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = [k for k in info.get("missing_keys", []) if not k.startswith("classifier")]
    if fresh:
        raise ConfigError(f"'{name}': the vision weights did not load into the classifier "
                          f"(e.g. '{sorted(fresh)[0]}' is missing)")
    return model


class ClassifyObjective:
    """Fine-tune the vision tower with label heads (see module docstring)."""

    name = "classify"
    # a SigLIP classifier keeps the vision tower's attention-pooling head, which its
    # logits do not use: DDP must look for parameters without gradient
    find_unused_parameters = True

    def __init__(self, cfg: TrainConfig, data: TrainData, accelerator: Any) -> None:
        from medsig.models.encoder import load_image_processor

        if not data.labels:
            raise ConfigError("objective 'classify' needs labels; the spec defines none",
                              file=cfg.spec)
        if cfg.adapt.method == "lora" and not cfg.adapt.lora.merge:
            raise ConfigError("objective 'classify' saves a plain transformers classifier: "
                              "use adapt.lora.merge: true")
        self.cfg, self.data, self.accelerator = cfg, data, accelerator
        self.heads = build_heads(data.collection, data.labels)
        rule = cfg.eval.thresholds
        unknown = [k for k in rule if k not in data.labels] if isinstance(rule, dict) else []
        if unknown:
            raise ConfigError(f"eval.thresholds: {', '.join(unknown)} is not a trained label "
                              f"(labels: {', '.join(data.labels)})")
        try:
            self.processor = load_image_processor(resolve_cached(cfg.model))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no image processor for '{cfg.model}': "
                              f"{str(exc).splitlines()[0]}") from None
        self.family = family_of(resolve_cached(cfg.model))
        recorded = read_record(resolve_cached(cfg.model))
        self.preprocess = family_preprocess(self.processor, self.family,
                                            cfg.preprocess or recorded.get("mode") or "reference",
                                            cfg.max_num_patches or recorded.get("max_num_patches"))
        self.image_size = int(self.preprocess.size)
        # fp32 master weights (a checkpoint may load in bf16); autocast runs bf16 / fp16
        model = load_classifier(cfg.model, self.heads).float().to(accelerator.device)
        self.model, self.report = adapt_model(model, cfg.adapt, head_modules=["classifier"])
        self.net: torch.nn.Module = self.model  # the loop prepares it (DDP for training)
        train_t, self.bce_cols = bce_targets(data.train, self.heads)
        self.train_bce = torch.as_tensor(train_t)
        self.val_bce = torch.as_tensor(bce_targets(data.val, self.heads)[0])
        self.pos_weight = pos_weight_from_targets(train_t).to(accelerator.device) \
            if self.bce_cols else None

    def begin_epoch(self, epoch: int) -> None:
        pass

    def plan(self, epoch: int, pool: np.ndarray, step_size: int, seed: int, plain_train: Any
             ) -> list[list[int]]:
        return step_batches(pool, step_size, seed, drop_last=False)

    def logits(self, pixels: Tensor, net: torch.nn.Module | None = None) -> Tensor:
        """Logits through ``net`` (training: the prepared module) or the plain model."""
        with self.accelerator.autocast():
            out = (net or self.model)(**model_inputs(pixels.to(self.accelerator.device))).logits
        return out.float()

    def loss(self, logits: Tensor, rows: list[int], collection: Collection, bce: Tensor
             ) -> Tensor:
        total = logits.new_zeros(())
        if self.bce_cols:
            total = total + masked_bce_loss(logits[:, self.bce_cols], bce[rows],
                                            self.pos_weight)
        for h in self.heads:
            if h.kind != "multiclass":
                continue
            y = torch.as_tensor(collection.labels[h.name].targets[rows], device=logits.device)
            if (y >= 0).any():
                total = total + F.cross_entropy(logits[:, h.cols], y, ignore_index=-1)
        return total

    def step(self, batches: list[Batch]) -> Tensor:
        """Forward + backward of this process's slice of each micro-batch; the loss is that
        of the global micro-batch (logits gathered from every process)."""
        acc = self.accelerator
        total = torch.zeros((), device=acc.device)
        for i, b in enumerate(batches):
            with no_sync_unless(acc, self.net, i == len(batches) - 1):
                rows, (logits,), anchor = global_batch(b.rows, [self.logits(b.pixels, self.net)],
                                                       b.ghost)
                loss = self.loss(logits, rows, self.data.train, self.train_bce)
                acc.backward((loss + anchor) / len(batches))
            total = total + loss.detach() / len(batches)
        return total

    # -- evaluation ------------------------------------------------------------------------
    def probabilities(self, logits: Tensor) -> Tensor:
        return head_probabilities(logits, self.heads)

    @torch.no_grad()
    def predict(self, val_batches: Iterable[Batch]) -> tuple[list[int], Tensor]:
        was = self.model.training
        self.model.eval()
        rows, parts = [], []
        for b in val_batches:
            rows.extend(b.rows)
            parts.append(self.logits(b.pixels))
        self.model.train(was)
        logits = torch.cat(parts) if parts else torch.zeros(
            (0, self.heads[-1].offset + self.heads[-1].size), device=self.accelerator.device)
        rows, (logits,) = gather_rows(rows, logits)  # every process's rows, in row order
        return rows, logits

    def evaluate(self, val_batches: Iterable[Batch]) -> dict[str, float]:
        """Macro AUC over binary / multilabel outputs (outputs with one class skipped)."""
        rows, logits = self.predict(val_batches)
        metrics = {"val/loss": float(self.loss(logits, rows, self.data.val, self.val_bce))}
        probs = self.probabilities(logits).cpu().numpy()
        bce_aucs, mc_aucs = [], []
        for h in self.heads:
            aucs = output_aucs(h, self._onehot_targets(h, rows), probs)
            if aucs:
                metrics[f"val/auc/{h.name}"] = float(np.mean(aucs))
            (mc_aucs if h.kind == "multiclass" else bce_aucs).extend(aucs)
            if h.kind == "multiclass":
                t = self.data.val.labels[h.name].targets[rows]
                ok = t >= 0
                if ok.any():
                    pred = probs[:, h.cols].argmax(axis=1)
                    metrics[f"val/accuracy/{h.name}"] = float((pred[ok] == t[ok]).mean())
        pool = bce_aucs or mc_aucs
        metrics["val/macro_auc"] = float(np.mean(pool)) if pool else float("nan")
        return metrics

    def _onehot_targets(self, h: Head, rows: list[int]) -> np.ndarray:
        """(n, size) 0/1 targets of a head's outputs, -1 where missing."""
        return h.onehot(self.data.val.labels[h.name].targets[rows])

    # -- output ----------------------------------------------------------------------------
    def thresholds(self, val_batches: Iterable[Batch]) -> list[Head]:
        """Heads with per-output thresholds chosen on val (Youden J or a min sensitivity)."""
        from medsig.models.thresholds import head_thresholds

        rows, logits = self.predict(val_batches)
        probs = self.probabilities(logits).cpu().numpy()
        targets = [self._onehot_targets(h, rows) for h in self.heads]
        return head_thresholds(self.heads, targets, probs, self.cfg.eval.thresholds)

    def save(self, out_dir: Path, val_batches: Iterable[Batch],
             state_dict: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Thresholds on the gathered val predictions (every process); the model written by
        the main process only (``state_dict``: its whole weights under FSDP)."""
        heads = self.thresholds(val_batches)
        if self.accelerator.is_main_process:
            from medsig.models.artifact import Preprocessing, write_image_processor

            export_model(self.model, out_dir, merge=True, state_dict=state_dict)
            if self.preprocess.mode in ("pad", "resize"):
                # plain transformers reproduces medsig's pad / resize exactly
                write_image_processor(out_dir, Preprocessing.of(self.preprocess))
            else:  # the checkpoint's own processor: the reference pipeline (or the processor)
                self.processor.save_pretrained(out_dir)
            write_record(out_dir, self.family, self.preprocess)
        return {"heads": heads, "prompts": {}, "image_size": self.image_size}


def output_aucs(h: Head, y: np.ndarray, probs: np.ndarray) -> list[float]:
    """The defined one-vs-rest AUCs of a head's outputs: `y` its (n, size) 0/1 targets (-1
    missing), `probs` every head's (n, k) probabilities."""
    aucs = (_auc(y[:, j], probs[:, h.offset + j]) for j in range(h.size))
    return [a for a in aucs if a is not None]


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC over the rows with a target (>= 0); None when they hold one class."""
    ok = y >= 0
    auc = roc_auc(y[ok], p[ok])
    return None if np.isnan(auc) else auc
