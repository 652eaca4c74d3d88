"""Fine-tuning losses (open_clip style): sigmoid / softmax contrastive, SupCon, masked BCE.

Contrastive losses share one signature::

    loss(image_emb (n, d), text_emb (m, d), *, logit_scale, logit_bias=None,
         positives=None, chunk_size=None) -> scalar

Embeddings are L2-normalised; ``logit_scale`` is the *log* scale (applied as ``.exp()``);
``positives`` is an (n, m) bool / float matrix (None: the diagonal). With ``chunk_size``
the logits are computed in row blocks (chunk_size x m) in the forward pass and recomputed
block by block in the backward pass, so memory grows with chunk_size x m instead of n x m.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medsig.errors import ConfigError

# (rows (k, d), cols (m, d), scale, bias | None, targets (k, m) | None, first row index)
# -> sum of the per-row losses of the block (scalar)
RowLoss = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", int], Tensor]


# ----------------------------------------------------------------------------- chunking
def _diagonal(start: int, rows: int, m: int, device: torch.device) -> Tensor:
    """Float identity block: rows start..start+rows of the (n, m) diagonal matrix."""
    r = torch.arange(start, start + rows, device=device)[:, None]
    return (r == torch.arange(m, device=device)[None, :]).float()


def _targets(targets: Tensor | None, start: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The float target block (the diagonal when ``targets`` is None)."""
    if targets is None:
        return _diagonal(start, rows.shape[0], cols.shape[0], rows.device).to(rows.dtype)
    return targets.to(rows.dtype)


def _block(targets: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if targets is None else targets[start:end]


class _ChunkedRows(torch.autograd.Function):
    """Sum of ``row_fn`` over row blocks; the backward pass recomputes one block at a time."""

    @staticmethod
    def forward(ctx: Any, row_fn: RowLoss, chunk: int, rows: Tensor, cols: Tensor,
                scale: Tensor, bias: Tensor | None, targets: Tensor | None) -> Tensor:
        ctx.row_fn, ctx.chunk = row_fn, chunk
        ctx.save_for_backward(rows, cols, scale, bias, targets)
        total = rows.new_zeros(())
        for s in range(0, rows.shape[0], chunk):
            e = min(s + chunk, rows.shape[0])
            total = total + row_fn(rows[s:e], cols, scale, bias, _block(targets, s, e), s)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        rows, cols, scale, bias, targets = ctx.saved_tensors
        need = ctx.needs_input_grad[2:6]
        leaves = [None if t is None else t.detach().requires_grad_(bool(n))
                  for t, n in zip((rows, cols, scale, bias), need)]
        _, cols_, scale_, bias_ = leaves
        grads: list[Tensor | None] = [None, None, None, None]
        row_grads = []
        for s in range(0, rows.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, rows.shape[0])
            with torch.enable_grad():
                blk = rows[s:e].detach().requires_grad_(bool(need[0]))
                inputs = (blk, cols_, scale_, bias_)
                wanted = [t for t, n in zip(inputs, need) if t is not None and n]
                out = ctx.row_fn(blk, cols_, scale_, bias_, _block(targets, s, e), s)
                got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
            for i, (t, n) in enumerate(zip(inputs, need)):
                if t is None or not n:
                    continue
                g = next(got)
                if g is None:
                    g = torch.zeros_like(t)
                if i == 0:
                    row_grads.append(g)
                else:
                    grads[i] = g if grads[i] is None else grads[i] + g
        if need[0]:
            grads[0] = torch.cat(row_grads)
        return (None, None, *grads, None)


def _row_sum(row_fn: RowLoss, rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None,
             targets: Tensor | None, chunk_size: int | None) -> Tensor:
    """Sum of ``row_fn`` over all rows, in blocks of ``chunk_size`` when it is set."""
    if chunk_size is None or chunk_size >= rows.shape[0]:
        return row_fn(rows, cols, scale, bias, targets, 0)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedRows.apply(row_fn, int(chunk_size), rows, cols, scale, bias, targets)


def _check(image_emb: Tensor, text_emb: Tensor, positives: Tensor | None,
           logit_scale: Tensor | float) -> tuple[Tensor, Tensor | None]:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be (n, d) and (m, d), got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)
    if positives is None:
        return scale, None
    shape = (image_emb.shape[0], text_emb.shape[0])
    if tuple(positives.shape) != shape:
        raise ValueError(f"positives must have shape {shape}, got {tuple(positives.shape)}")
    return scale, positives.to(device=image_emb.device)  # bool stays bool: 1 byte a pair


# ----------------------------------------------------------------------------- sigmoid
def _sigmoid_rows(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None,
                  targets: Tensor | None, start: int) -> Tensor:
    logits = rows @ cols.T * scale.exp()
    if bias is not None:
        logits = logits + bias
    targets = _targets(targets, start, rows, cols)
    # -(p log s(z) + (1 - p) log s(-z)); for 0/1 targets this is -logsigmoid(label * z)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, *, logit_scale: Tensor,
                 logit_bias: Tensor | None = None, positives: Tensor | None = None,
                 chunk_size: int | None = None) -> Tensor:
    """SigLIP pairwise sigmoid loss (multi-positive with ``positives``).

    Sum over texts, mean over images, as ``SiglipModel(return_loss=True)``; soft (float)
    positives p give ``-(p log s(z) + (1-p) log s(-z))`` per pair.
    """
    scale, pos = _check(image_emb, text_emb, positives, logit_scale)
    bias = None if logit_bias is None else torch.as_tensor(logit_bias).to(image_emb)
    total = _row_sum(_sigmoid_rows, image_emb, text_emb, scale, bias, pos, chunk_size)
    return total / image_emb.shape[0]


# ----------------------------------------------------------------------------- softmax
def _softmax_rows(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None,
                  targets: Tensor | None, start: int) -> Tensor:
    logp = torch.log_softmax(rows @ cols.T * scale.exp(), dim=1)
    targets = _targets(targets, start, rows, cols)
    weight = targets / targets.sum(1, keepdim=True).clamp(min=1e-12)  # rows without positive: 0
    return -(weight * logp).sum()


def _rows_with_positive(pos: Tensor | None, n: int, m: int) -> int:
    if pos is None:
        return min(n, m)
    return int((pos.sum(1) > 0).sum())


def softmax_loss(image_emb: Tensor, text_emb: Tensor, *, logit_scale: Tensor,
                 logit_bias: Tensor | None = None, positives: Tensor | None = None,
                 chunk_size: int | None = None) -> Tensor:
    """CLIP InfoNCE: mean of image->text and text->image cross-entropy; bias is ignored.

    Each row's target is spread uniformly over its positives (soft multi-positive targets);
    rows with no positive are left out of that direction's mean.
    """
    scale, pos = _check(image_emb, text_emb, positives, logit_scale)
    n, m = image_emb.shape[0], text_emb.shape[0]
    pos_t = None if pos is None else pos.T
    i2t = _row_sum(_softmax_rows, image_emb, text_emb, scale, None, pos, chunk_size)
    t2i = _row_sum(_softmax_rows, text_emb, image_emb, scale, None, pos_t, chunk_size)
    n_i, n_t = _rows_with_positive(pos, n, m), _rows_with_positive(pos_t, m, n)
    return (i2t / max(n_i, 1) + t2i / max(n_t, 1)) / 2


# ----------------------------------------------------------------------------- positives
def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def positives_from_labels(labels: Any, mode: str = "same_class",
                          texts: Sequence[str] | None = None) -> Tensor:
    """(n, n) bool positive pairs; the diagonal is always positive.

    same_class: int labels (n,), -1 (missing) never pairs with another row (a coarse
    category is same_class on the coarse labels); any_shared: multilabel (n, C) 0/1 (-1
    missing), positive when a label is shared; identical_text: equal strings in ``texts``.
    """
    if mode == "identical_text":
        if texts is None:
            raise ConfigError("positives mode 'identical_text' needs texts")
        _, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str),
                               return_inverse=True)
        t = torch.as_tensor(inverse.reshape(-1))
        return t[:, None] == t[None, :]
    if labels is None:
        raise ConfigError(f"positives mode '{mode}' needs labels")
    y = _tensor(labels)
    eye = torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
    if mode == "same_class":
        if y.ndim != 1:
            raise ConfigError(f"same_class positives need 1-D class labels, got shape "
                              f"{tuple(y.shape)}")
        y = y.long()
        return ((y[:, None] == y[None, :]) & (y >= 0)[:, None]) | eye
    if mode == "any_shared":
        if y.ndim != 2:
            raise ConfigError(f"any_shared positives need (n, C) multilabel targets, got "
                              f"shape {tuple(y.shape)}")
        present = (y > 0).float()
        return (present @ present.T > 0) | eye
    raise ConfigError(f"unknown positives mode '{mode}'; choose same_class, any_shared or "
                      "identical_text")


# ----------------------------------------------------------------------------- SupCon
def _supcon_rows(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None,
                 targets: Tensor | None, start: int) -> Tensor:
    logits = rows @ cols.T * scale.exp()
    self_mask = _diagonal(start, rows.shape[0], cols.shape[0], rows.device).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    logp = torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
    pos = _targets(targets, start, rows, cols).masked_fill(self_mask, 0.0)
    count = pos.sum(1)
    per_row = -(pos * logp).sum(1) / count.clamp(min=1e-12)
    return torch.where(count > 0, per_row, torch.zeros_like(per_row)).sum()


def supcon_loss(emb: Tensor, labels: Any = None, *, positives: Tensor | None = None,
                temperature: float = 0.1, chunk_size: int | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al., L_out) on L2-normalised embeddings.

    Positives come from ``positives`` (n, n) or ``labels`` (1-D: same class, 2-D: any shared
    label); self-pairs are excluded and anchors without a positive are skipped.
    """
    if positives is None:
        if labels is None:
            raise ConfigError("supcon_loss needs labels or positives")
        y = _tensor(labels)
        positives = positives_from_labels(y, "same_class" if y.ndim == 1 else "any_shared")
    n = emb.shape[0]
    if tuple(positives.shape) != (n, n):
        raise ValueError(f"positives must have shape {(n, n)}, got {tuple(positives.shape)}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    pos = positives.to(device=emb.device)
    anchors = int(((pos.float().sum(1) - pos.diagonal().float()) > 0).sum())
    if anchors == 0:
        return (emb * 0.0).sum()
    scale = torch.tensor(-float(np.log(temperature)), dtype=emb.dtype, device=emb.device)
    total = _row_sum(_supcon_rows, emb, emb, scale, None, pos, chunk_size)
    return total / max(anchors, 1)


# ----------------------------------------------------------------------------- masked BCE
def masked_bce_loss(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """BCE-with-logits over entries whose target is not -1, averaged over valid entries.

    Returns 0 (still attached to ``logits``) when no entry is valid.
    """
    targets = _tensor(targets).to(device=logits.device, dtype=logits.dtype)
    if targets.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must have the same shape")
    valid = targets >= 0
    if pos_weight is not None:
        pos_weight = _tensor(pos_weight).to(device=logits.device, dtype=logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), reduction="none",
                                             pos_weight=pos_weight)
    per = torch.where(valid, per, torch.zeros_like(per))
    return per.sum() / valid.sum().clamp(min=1)


def pos_weight_from_targets(targets: Any, max_weight: float = 100.0) -> Tensor:
    """n_neg / n_pos per label over valid (!= -1) entries; counts clamped to >= 1.

    A label with no positive (or no negative) gets a finite weight, capped at ``max_weight``.
    1-D (binary) targets give a (1,) tensor.
    """
    y = _tensor(targets).float()
    if y.ndim == 1:
        y = y[:, None]
    n_pos = (y > 0.5).sum(0).float()
    n_neg = ((y >= 0) & (y <= 0.5)).sum(0).float()
    return (n_neg.clamp(min=1) / n_pos.clamp(min=1)).clamp(max=max_weight)


# ----------------------------------------------------------------------------- registry
ContrastiveLoss = Callable[..., Tensor]

CONTRASTIVE_LOSSES: dict[str, ContrastiveLoss] = {
    "sigmoid": sigmoid_loss,
    "multi_positive_sigmoid": sigmoid_loss,  # the training loop passes `positives`
    "softmax": softmax_loss,
}


def get_loss(name: str) -> ContrastiveLoss:
    """The contrastive loss called ``name``; ConfigError for an unknown name."""
    try:
        return CONTRASTIVE_LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss '{name}'; choose one of "
                          f"{', '.join(sorted(CONTRASTIVE_LOSSES))}") from None


# ----------------------------------------------------------------------------- memory
def loss_peak_memory(n: int, d: int, chunk_size: int | None, loss: str = "sigmoid",
                     device: str | torch.device = "cpu", seed: int = 0) -> int:
    """Peak bytes allocated by torch during one forward + backward of ``loss`` on n pairs.

    Inputs (2 x n x d embeddings) are allocated before measuring. CUDA: the allocator's peak;
    CPU: allocation events recorded by the profiler (``profile_memory=True``).
    """
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev).requires_grad_()
    scale = torch.tensor(float(np.log(10.0)), device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    fn = get_loss(loss)

    def run() -> None:
        fn(img, txt, logit_scale=scale, logit_bias=bias, chunk_size=chunk_size).backward()

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        run()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return int(max(itertools.accumulate((e.nbytes() for e in events), initial=0)))
