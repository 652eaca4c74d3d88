"""Contrastive objective: image-text fine-tuning with multi-positive losses.

Positives: loss `sigmoid` treats identical texts as positives (so duplicate captions are
never pushed apart); `multi_positive_sigmoid` and `softmax` use `contrastive.positives`
(same_class / any_shared / coarse on the main label, or identical_text).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsig.data.collection import Collection
from medsig.errors import ConfigError, DataError
from medsig.metrics.clustering import clustering_metrics
from medsig.metrics.retrieval import retrieval_ranks, summarize_ranks
from medsig.models.families import write_record
from medsig.models.heads import heads_for
from medsig.models.zeroshot import class_prompts
from medsig.train.adapt import adapt_model, export_model
from medsig.train.config import TrainConfig
from medsig.train.data import Batch, TrainData, epoch_texts, single_class, step_batches
from medsig.train.distributed import (
    gather,
    gather_rows,
    gather_with_grad,
    global_batch,
    no_sync_unless,
)
from medsig.train.gradcache import gradcache_pairs
from medsig.train.losses import get_loss, positives_from_labels, supcon_loss


def _positive_source(collection: Collection, main: str, mode: str) -> tuple[str, np.ndarray]:
    """('same_class', (n,) ids) or ('any_shared', (n, C) 0/1) for a label-based mode."""
    name = main
    if mode == "coarse":
        lab = collection.labels[main]
        if lab.parent is None:
            coarse = [k for k, v in collection.labels.items() if v.parent == main]
            if not coarse:
                raise ConfigError(f"contrastive.positives 'coarse': label '{main}' has no "
                                  "coarse map in the spec")
            name = coarse[0]
    lab = collection.labels[name]
    if mode == "same_class" or (mode == "coarse" and lab.kind != "multilabel"):
        return "same_class", single_class(collection, name)
    if lab.kind == "multilabel":
        return "any_shared", np.where(lab.targets > 0, 1.0, 0.0).astype(np.float32)
    return "any_shared", lab.onehot().astype(np.float32)


class DualTowers(nn.Module):
    """Both towers in one forward: the module DDP wraps, so that every training pass runs
    through the wrapper and uses every trainable parameter (the loss uses the logit scale /
    bias directly). Returns L2-normalised float image and text features."""

    def __init__(self, model: nn.Module, encoder: Any) -> None:
        super().__init__()
        self.model = model  # the adapted model (a peft wrapper holds the encoder's model)
        self._encoder = [encoder]  # a list: not registered as a submodule

    def forward(self, pixel_values: Tensor, input_ids: Tensor,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        encoder = self._encoder[0]
        img = encoder.image_features(pixel_values)
        txt = encoder.text_features(input_ids, attention_mask)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


class ContrastiveObjective:
    """Image-text fine-tuning of a SigLIP / CLIP model (see module docstring)."""

    name = "contrastive"
    find_unused_parameters = False  # DualTowers uses both towers in every pass

    def __init__(self, cfg: TrainConfig, data: TrainData, accelerator: Any) -> None:
        from medsig.models.encoder import Encoder

        self.cfg, self.data, self.accelerator = cfg, data, accelerator
        self.encoder = Encoder.load(cfg.model, device=accelerator.device,
                                    preprocess=cfg.preprocess,
                                    max_num_patches=cfg.max_num_patches)
        if self.encoder.tokenizer is None or self.encoder.kind == "image":
            raise ConfigError(f"objective 'contrastive' needs an image-text model; '{cfg.model}'"
                              " is image-only (use objective classify or probe)")
        c = cfg.contrastive
        self.main: str | None = c.main_label or (data.labels[0] if data.labels else None)
        if self.main is not None and self.main not in data.collection.labels:
            raise ConfigError(f"contrastive.main_label '{self.main}' is not a label of the spec")
        needs_labels = c.positives != "identical_text" and c.loss != "sigmoid"
        if (needs_labels or c.supcon_weight > 0) and c.positives != "identical_text" \
                and self.main is None:
            raise ConfigError(f"contrastive.positives '{c.positives}' needs a label; the spec "
                              "has none (use positives: identical_text)")
        self.loss_fn = get_loss(c.loss)
        self.encoder.model.float()  # fp32 master weights; autocast runs bf16 / fp16
        self.model, self.report = adapt_model(self.encoder.model, cfg.adapt)
        self.net: nn.Module = DualTowers(self.model, self.encoder)  # the loop prepares it
        self.preprocess, self.image_size = self.encoder.preprocess, self.encoder.image_size
        self.train_pos = self._source(data.train)
        self.val_pos = self._source(data.val)
        self.val_texts = data.val.texts()
        self.texts: list[str] = data.train.texts()
        self._tokens: dict[str, Tensor] | None = None

    # -- helpers ---------------------------------------------------------------------------
    def _source(self, collection: Collection) -> tuple[str, np.ndarray] | None:
        mode = self.cfg.contrastive.positives
        if mode == "identical_text" or self.main is None:
            return None
        return _positive_source(collection, self.main, mode)

    def _positives(self, rows: list[int], texts: list[str], source: Any, for_text: bool
                   ) -> Tensor:
        if (for_text and self.cfg.contrastive.loss == "sigmoid") or source is None:
            pos = positives_from_labels(None, "identical_text", texts=texts)
        else:
            pos = positives_from_labels(torch.as_tensor(source[1][rows]), source[0])
            pos = pos | positives_from_labels(None, "identical_text", texts=texts)
        return pos.to(self.accelerator.device)

    def encode_images(self, pixels: Tensor) -> Tensor:
        with self.accelerator.autocast():
            feats = self.encoder.image_features(pixels.to(self.accelerator.device))
        return F.normalize(feats.float(), dim=-1)

    def encode_texts(self, tokens: dict[str, Tensor]) -> Tensor:
        tokens = {k: v.to(self.accelerator.device) for k, v in tokens.items()}
        with self.accelerator.autocast():
            feats = self.encoder.text_features(tokens["input_ids"], tokens.get("attention_mask"))
        return F.normalize(feats.float(), dim=-1)

    def _scale_bias(self) -> tuple[Tensor, Tensor | None]:
        model = self.encoder.model
        return model.logit_scale, getattr(model, "logit_bias", None)

    def loss(self, img: Tensor, txt: Tensor, pos_text: Tensor, pos_img: Tensor,
             scale_bias: list[Tensor] | None = None) -> Tensor:
        """The loss of a (global) batch; ``scale_bias`` replaces the model's logit scale and
        bias (gradient caching passes detached copies)."""
        c = self.cfg.contrastive
        scale, bias = self._scale_bias()
        if scale_bias is not None:
            scale, bias = scale_bias[0], (scale_bias[1] if len(scale_bias) > 1 else bias)
        loss = self.loss_fn(img, txt, logit_scale=scale.float(),
                            logit_bias=None if bias is None else bias.float(),
                            positives=pos_text, chunk_size=c.chunk_size)
        if c.supcon_weight > 0:
            loss = loss + c.supcon_weight * supcon_loss(img, positives=pos_img,
                                                        temperature=c.supcon_temperature)
        if bias is not None and c.loss == "softmax":
            # softmax ignores the bias: a zero term gives it a (zero) gradient, as DDP
            # expects of every trainable parameter
            loss = loss + 0.0 * bias.float().sum()
        return loss

    # -- training --------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self.texts = epoch_texts(self.data.train, self.cfg, epoch)
        # the epoch's texts tokenised once, in one call, instead of at every step
        self._tokens = self.encoder.tokenize(self.texts) if self.texts else None

    def tokens(self, rows: list[int]) -> dict[str, Tensor]:
        """Token tensors of training rows (trimmed to the longest of them, for CLIP)."""
        if self._tokens is None:
            return self.encoder.tokenize([self.texts[r] for r in rows])
        index = torch.as_tensor(rows, dtype=torch.long)
        out = {k: v[index] for k, v in self._tokens.items()}
        mask = out.get("attention_mask")
        if mask is not None and self.encoder.kind != "siglip":
            width = int(mask.sum(dim=1).max())
            out = {k: v[:, :width] for k, v in out.items()}
        return out

    def plan(self, epoch: int, pool: np.ndarray, step_size: int, seed: int,
             plain_train: Callable[[], Iterable[Batch]]) -> list[list[int]]:
        drop_last = True
        if not self.cfg.contrastive.hard_negatives:
            return step_batches(pool, step_size, seed, drop_last)
        neighbours = self._hard_negatives(plain_train)
        return hard_negative_batches(pool, neighbours, step_size, seed, drop_last)

    @torch.no_grad()
    def _hard_negatives(self, plain_train: Callable[[], Iterable[Batch]]) -> dict[int, list[int]]:
        """For each train row, the rows whose texts are nearest but are not positives."""
        was = self.model.training
        self.model.eval()
        rows, img = self._embed_rows(plain_train())
        txt = self._embed_texts([self.texts[r] for r in rows])
        self.model.train(was)
        sim = img @ txt.T
        pos = self._positives(rows, [self.texts[r] for r in rows], self.train_pos, True)
        sim = sim.masked_fill(pos, float("-inf"))
        k = min(self.cfg.contrastive.hard_negatives_k, max(len(rows) - 1, 1))
        top = sim.topk(k, dim=1)
        out: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            out[r] = [rows[j] for j, v in zip(top.indices[i].tolist(), top.values[i].tolist())
                      if v != float("-inf")]
        return out

    def _scale_bias_params(self) -> list[Tensor]:
        return [t for t in self._scale_bias() if t is not None]

    def _forward(self, b: Batch) -> tuple[Tensor, Tensor]:
        """A micro-batch's features through the prepared (DDP-wrapped) module."""
        tokens = {k: v.to(self.accelerator.device) for k, v in self.tokens(b.rows).items()}
        with self.accelerator.autocast():
            return self.net(b.pixels.to(self.accelerator.device), tokens["input_ids"],
                            tokens.get("attention_mask"))

    def _global_loss(self, rows: list[int], img: Tensor, txt: Tensor,
                     scale_bias: list[Tensor] | None = None) -> Tensor:
        """The loss of the global batch: positives from every process's rows."""
        texts = [self.texts[r] for r in rows]
        return self.loss(img, txt, self._positives(rows, texts, self.train_pos, True),
                         self._positives(rows, texts, self.train_pos, False), scale_bias)

    def step(self, batches: list[Batch]) -> Tensor:
        """Forward + backward over one optimizer step's micro-batches (this process's slice
        of each, the loss over the global batch); the mean loss."""
        if self.cfg.optim.gradcache:
            return self._gradcache_step(batches)
        acc = self.accelerator
        total = torch.zeros((), device=acc.device)
        for i, b in enumerate(batches):
            with no_sync_unless(acc, self.net, i == len(batches) - 1):
                rows, (img, txt), anchor = global_batch(b.rows, list(self._forward(b)), b.ghost)
                loss = self._global_loss(rows, img, txt)
                acc.backward((loss + anchor) / len(batches))
            total = total + loss.detach() / len(batches)
        return total

    def _gradcache_step(self, batches: list[Batch]) -> Tensor:
        """One loss over every micro-batch of the step (gradient caching)."""
        device = self.accelerator.device
        rows = [gather(torch.as_tensor([] if b.ghost else b.rows, dtype=torch.long,
                                       device=device)).tolist() for b in batches]
        own = [0 if b.ghost else len(b.rows) for b in batches]
        everyone = [r for part in rows for r in part]
        return gradcache_pairs(
            self._forward, batches,
            lambda img, txt, sb: self._global_loss(everyone, img, txt, sb),
            self._scale_bias_params(), backward=self.accelerator.backward,
            no_sync=lambda: self.accelerator.no_sync(self.net),
            gather=lambda k, t: gather_with_grad(t[:own[k]]))

    # -- evaluation ------------------------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> Tensor:
        bs = max(self.cfg.optim.batch_size, 32)
        parts = [self.encode_texts(self.encoder.tokenize(texts[i:i + bs]))
                 for i in range(0, len(texts), bs)]
        return torch.cat(parts)

    @torch.no_grad()
    def evaluate(self, val_batches: Iterable[Batch]) -> dict[str, float]:
        """Recall@1/5 image->text over the distinct val texts, text->image R@1, NMI, loss."""
        was = self.model.training
        self.model.eval()
        rows, img = self._embed_rows(val_batches)
        texts = [self.val_texts[r] for r in rows]
        distinct, inverse = np.unique(np.array(texts, dtype=object).astype(str),
                                      return_inverse=True)
        gallery = self._embed_texts(distinct.tolist())
        inverse_t = torch.as_tensor(inverse.reshape(-1), device=img.device)
        txt = gallery[inverse_t]
        pos_t = self._positives(rows, texts, self.val_pos, True)
        pos_i = self._positives(rows, texts, self.val_pos, False)
        metrics = {"val/loss": float(self.loss(img, txt, pos_t, pos_i))}
        i2t, t2i = retrieval_ranks(img, gallery, (inverse.reshape(-1), np.arange(len(distinct))))
        i2t_recall = summarize_ranks(i2t, (1, 5))
        metrics.update({f"val/recall@{k}": i2t_recall[f"recall@{k}"] for k in (1, 5)})
        metrics["val/t2i_recall@1"] = summarize_ranks(t2i, (1,))["recall@1"]
        if self.main is not None:
            metrics["val/nmi"] = nmi(img.cpu().numpy(), single_class(self.data.val,
                                                                     self.main)[rows],
                                     self.cfg.seed)
        self.model.train(was)
        return metrics

    def _embed_rows(self, batches: Iterable[Batch]) -> tuple[list[int], Tensor]:
        """Image embeddings of this process's rows, gathered from every process (row order)."""
        rows, embs = [], []
        for b in batches:
            rows.extend(b.rows)
            embs.append(self.encode_images(b.pixels))
        img = torch.cat(embs) if embs else torch.zeros((0, self._width()),
                                                      device=self.accelerator.device)
        rows, (img,) = gather_rows(rows, img)
        return rows, img

    def _width(self) -> int:
        return int(self._embed_texts(["x"]).shape[1])

    # -- output ----------------------------------------------------------------------------
    def save(self, out_dir: Path, val_batches: Iterable[Batch],
             state_dict: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Write the model (main process only; ``state_dict``: its whole weights under FSDP);
        the heads and prompts for medsig.json."""
        if self.accelerator.is_main_process:
            lora = self.cfg.adapt.lora
            export_model(self.model, out_dir, merge=lora.merge, base_name=self.cfg.model,
                         state_dict=state_dict)
            self.encoder.tokenizer.save_pretrained(out_dir)
            self.encoder.image_processor.save_pretrained(out_dir)
            write_record(out_dir, self.encoder.family, self.encoder.preprocess)
        labels = self.data.collection.labels
        heads = heads_for(labels[name] for name in self.data.labels)
        return {"heads": heads, "prompts": class_prompts(self.data.collection, self.data.labels),
                "image_size": self.image_size}


def nmi(emb: np.ndarray, classes: np.ndarray, seed: int = 0) -> float:
    """NMI between k-means clusters of the embeddings and the classes; NaN when too few."""
    try:
        return float(clustering_metrics(emb, classes, seed=seed)["nmi"])
    except DataError:
        return float("nan")


def hard_negative_batches(pool: np.ndarray, neighbours: dict[int, list[int]], step_size: int,
                          seed: int, drop_last: bool) -> list[list[int]]:
    """Batches where each anchor is followed by its hard negatives (when still unused)."""
    rng = np.random.default_rng(seed)
    left = Counter(pool.tolist())
    batches: list[list[int]] = []
    current: list[int] = []
    for r in rng.permutation(pool).tolist():
        if left[r] == 0:
            continue
        group = [r]
        left[r] -= 1
        for j in neighbours.get(r, []):
            if len(current) + len(group) >= step_size:
                break
            if left[j] > 0:
                group.append(j)
                left[j] -= 1
        current.extend(group)
        while len(current) >= step_size:
            batches.append(current[:step_size])
            current = current[step_size:]
    if current and (not drop_last or not batches):
        batches.append(current)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]
