"""Image <-> text retrieval metrics over the whole pool, zero-shot scores, distractor accuracy.

Ranks are computed block by block (never the n x n matrix). **Ties count against the
query**: the rank of a query's first positive is 1 + the number of non-positive items
scoring *at least* as high as its best positive (within ``TIE_TOL``, the float32 rounding of
a cosine computed in two different blocks). A model whose embeddings collapsed to one
vector thus ranks every positive last (Recall@1 = 0, at or below chance), never first; a
"strictly higher" rule would give it Recall@1 = 1. The same rule serves the global and the
batch-wise recall, and so training's validation recall (``train/contrastive.py``).
One similarity block serves both directions (rows: image->text, columns: text->image).
Embeddings are L2-normalised here when they are not already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsig.data.vectors import normalize
from medsig.errors import ConfigError, DataError

_BLOCK_ELEMS = 1 << 22  # CPU block of ~16 MB keeps the compare / count passes in cache
TIE_TOL = 1e-5  # cosines this close to the best positive are ties (counted against it)


def _device(device: Any, *arrays: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _encode_groups(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer group ids (negative = no positive); strings are mapped, '' / None missing."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return a.astype(np.int64), b.astype(np.int64)

    def text(v: np.ndarray) -> np.ndarray:
        return np.array(["" if x is None or x != x else str(x) for x in v.tolist()], dtype=object)

    sa, sb = text(a), text(b)
    values, inv = np.unique(np.concatenate([sa, sb]).astype(str), return_inverse=True)
    inv = inv.astype(np.int64)
    if len(values) and values[0] == "":
        inv = inv - 1  # "" sorts first: becomes -1 (missing)
    return inv[: len(sa)], inv[len(sa):]


def _groups(positives: Any, n_i: int, n_t: int) -> tuple[np.ndarray, np.ndarray]:
    if positives is None:
        if n_i != n_t:
            raise DataError(f"{n_i} images and {n_t} texts: pass positives (groups) when the "
                            "pools differ in size")
        return np.arange(n_i), np.arange(n_t)
    if isinstance(positives, (tuple, list)) and len(positives) == 2 \
            and all(np.ndim(p) == 1 for p in positives):
        gi, gt = _encode_groups(*positives)
    else:
        gi, gt = _encode_groups(positives, positives)
    if gi.shape != (n_i,) or gt.shape != (n_t,):
        raise DataError(f"positives: group arrays {gi.shape} / {gt.shape} do not match "
                        f"{n_i} images / {n_t} texts")
    return gi, gt


def _sorted(x: torch.Tensor, g: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    order = np.argsort(g, kind="stable")
    if len(g) < 2 or bool((np.diff(g) >= 0).all()):
        return x, g, order
    return x.index_select(0, torch.from_numpy(order).to(x.device)), g[order], order


def retrieval_ranks(image_emb: Any, text_emb: Any, positives: Any = None,
                    chunk_size: int = 4096, device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of the first positive per image query and per text query (-1: none).

    ``positives``: None = pairs i <-> i; an array g (n,) = i and j match when g[i] == g[j]
    (same label / same case); or (image_groups, text_groups) for pools of different sizes.
    Negative (or empty-string) group ids mark rows without positives: they are not queries
    but stay in the pool as non-positives.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = _device(device, image_emb, text_emb)
    a = normalize(image_emb, dev, "image embeddings")
    b = normalize(text_emb, dev, "text embeddings")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"image embeddings have dim {a.shape[1]}, text embeddings {b.shape[1]}")
    n_i, n_t = a.shape[0], b.shape[0]
    gi, gt = _groups(positives, n_i, n_t)
    a, gi_s, oi = _sorted(a, gi)
    b, gt_s, ot = _sorted(b, gt)
    rows = chunk_size
    cols = chunk_size if dev.type != "cpu" else min(chunk_size, max(1, _BLOCK_ELEMS // rows))
    ti = torch.from_numpy(gi_s).to(dev)
    tt = torch.from_numpy(gt_s).to(dev)
    best_i = torch.full((n_i,), -torch.inf, device=dev)
    best_t = torch.full((n_t,), -torch.inf, device=dev)
    # pass 1: best positive per query; positives of a row chunk lie in one column range
    for r0 in range(0, n_i, rows):
        r1 = min(r0 + rows, n_i)
        g_r = gi_s[r0:r1]
        if g_r[-1] < 0:
            continue
        lo = int(np.searchsorted(gt_s, max(int(g_r[0]), 0), "left"))
        hi = int(np.searchsorted(gt_s, int(g_r[-1]), "right"))
        for c0 in range(lo, hi, cols):
            c1 = min(c0 + cols, hi)
            pos = (ti[r0:r1, None] == tt[None, c0:c1]) & (ti[r0:r1, None] >= 0)
            s = (a[r0:r1] @ b[c0:c1].T).masked_fill_(~pos, -torch.inf)
            torch.maximum(best_i[r0:r1], s.amax(1), out=best_i[r0:r1])
            torch.maximum(best_t[c0:c1], s.amax(0), out=best_t[c0:c1])
    # pass 2: count non-positives scoring at least the best positive (ties: against)
    cnt_i = torch.zeros(n_i, dtype=torch.int64, device=dev)
    cnt_t = torch.zeros(n_t, dtype=torch.int64, device=dev)
    sbuf = torch.empty(rows * cols, device=dev)
    mbuf = torch.empty(rows * cols, dtype=torch.bool, device=dev)
    for r0 in range(0, n_i, rows):
        r1 = min(r0 + rows, n_i)
        a_r, b_r, g_r = a[r0:r1], best_i[r0:r1, None] - TIE_TOL, gi_s[r0:r1]
        for c0 in range(0, n_t, cols):
            c1 = min(c0 + cols, n_t)
            shape = (r1 - r0, c1 - c0)
            s = torch.mm(a_r, b[c0:c1].T, out=sbuf[: shape[0] * shape[1]].view(shape))
            m = mbuf[: shape[0] * shape[1]].view(shape)
            overlap = g_r[-1] >= 0 and g_r[-1] >= gt_s[c0] and gt_s[c1 - 1] >= g_r[0]
            notpos = ti[r0:r1, None] != tt[None, c0:c1] if overlap else None
            torch.ge(s, b_r, out=m)
            if notpos is not None:
                m.logical_and_(notpos)
            cnt_i[r0:r1] += m.view(torch.uint8).sum(1, dtype=torch.int32)
            torch.ge(s, best_t[None, c0:c1] - TIE_TOL, out=m)
            if notpos is not None:
                m.logical_and_(notpos)
            cnt_t[c0:c1] += m.view(torch.uint8).sum(0, dtype=torch.int32)
    out = []
    for cnt, best, order in ((cnt_i, best_i, oi), (cnt_t, best_t, ot)):
        r = torch.where(torch.isfinite(best), cnt + 1, -1).cpu().numpy()
        ranks = np.empty_like(r)
        ranks[order] = r
        out.append(ranks)
    return out[0], out[1]


def summarize_ranks(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K, median / mean rank and MRR over queries that have a positive."""
    ranks = np.asarray(ranks)
    r = ranks[ranks > 0].astype(np.float64)
    nan = float("nan")
    out = {f"recall@{k}": float((r <= k).mean()) if r.size else nan for k in ks}
    out.update(median_rank=float(np.median(r)) if r.size else nan,
               mean_rank=float(r.mean()) if r.size else nan,
               mrr=float((1.0 / r).mean()) if r.size else nan,
               n_queries=int(r.size), n_without_positive=int((ranks <= 0).sum()))
    return out


def retrieval_metrics(image_emb: Any, text_emb: Any, positives: Any = None,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096,
                      device: Any = None) -> dict[str, Any]:
    """Global image->text and text->image Recall@K, median rank, mean rank and MRR."""
    ri, rt = retrieval_ranks(image_emb, text_emb, positives, chunk_size, device)
    return {"image_to_text": summarize_ranks(ri, ks), "text_to_image": summarize_ranks(rt, ks),
            "n_images": int(len(ri)), "n_texts": int(len(rt))}


def batchwise_recall(image_emb: Any, text_emb: Any, batch_size: int = 32,
                     ks: Sequence[int] = (1, 5), positives: Any = None, seed: int = 0,
                     device: Any = None) -> dict[str, Any]:
    """Recall@K inside random batches of ``batch_size`` pairs (what many papers report).

    The pool is permuted with ``seed`` and cut into full batches (an incomplete last batch
    is dropped; a pool smaller than one batch is a single batch). Ranks use the same rule as
    :func:`retrieval_ranks`, with positives restricted to the batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev = _device(device, image_emb, text_emb)
    a = normalize(image_emb, dev, "image embeddings")
    b = normalize(text_emb, dev, "text embeddings")
    n = a.shape[0]
    if b.shape != a.shape:
        raise DataError(f"batch-wise recall needs paired pools: {tuple(a.shape)} images vs "
                        f"{tuple(b.shape)} texts")
    gi, gt = _groups(positives, n, n)
    bs = min(batch_size, n)
    nb = n // bs if bs else 0
    idx = np.random.default_rng(seed).permutation(n)[: nb * bs].reshape(nb, bs)
    ti, tt = torch.from_numpy(gi).to(dev), torch.from_numpy(gt).to(dev)
    ranks_i, ranks_t = [], []
    step = max(1, _BLOCK_ELEMS // max(1, bs * a.shape[1]))
    for b0 in range(0, nb, step):
        ii = torch.from_numpy(idx[b0:b0 + step]).to(dev)
        s = torch.bmm(a[ii], b[ii].transpose(1, 2))
        g_i, g_t = ti[ii], tt[ii]
        pos = (g_i[:, :, None] == g_t[:, None, :]) & (g_i[:, :, None] >= 0)
        masked = s.masked_fill(~pos, -torch.inf)
        for best, dim in ((masked.amax(2), 2), (masked.amax(1), 1)):
            above = (s >= best.unsqueeze(dim) - TIE_TOL) & ~pos
            r = torch.where(torch.isfinite(best), above.sum(dim) + 1, -1)
            (ranks_i if dim == 2 else ranks_t).append(r.reshape(-1).cpu().numpy())
    ri = np.concatenate(ranks_i) if ranks_i else np.zeros(0, np.int64)
    rt = np.concatenate(ranks_t) if ranks_t else np.zeros(0, np.int64)
    return {"image_to_text": summarize_ranks(ri, ks), "text_to_image": summarize_ranks(rt, ks),
            "batch_size": int(bs), "n_batches": int(nb), "n_dropped": int(n - nb * bs),
            "seed": seed}


def class_embeddings(class_text_emb: Any, device: Any = None) -> torch.Tensor:
    """(C, d) unit class embeddings; (C, T, d) templates are normalised, averaged, renormalised."""
    t = class_text_emb.detach() if isinstance(class_text_emb, torch.Tensor) \
        else torch.as_tensor(np.asarray(class_text_emb))
    dev = _device(device, class_text_emb)
    if t.ndim == 3:
        t = normalize(t.reshape(-1, t.shape[-1]), dev, "class text embeddings").reshape(t.shape)
        t = t.mean(dim=1)
    return normalize(t, dev, "class text embeddings")


def zeroshot_scores(image_emb: Any, class_text_emb: Any, logit_scale: float = 100.0,
                    logit_bias: float | None = None, multilabel: bool = False,
                    activation: str = "auto", device: Any = None) -> np.ndarray:
    """Zero-shot class probabilities (n, C) from cosine similarities.

    logits = logit_scale * cos + logit_bias, where ``logit_scale`` is the multiplier (the exp
    of a model's log-scale parameter). ``activation`` "auto": sigmoid per class when
    ``multilabel`` or a bias is given (SigLIP-style), else softmax over classes.
    """
    if activation not in ("auto", "sigmoid", "softmax"):
        raise ConfigError(f"activation must be auto, sigmoid or softmax, got {activation!r}")
    dev = _device(device, image_emb)
    img = normalize(image_emb, dev, "image embeddings")
    cls = class_embeddings(class_text_emb, dev)
    if cls.shape[1] != img.shape[1]:
        raise DataError(f"image embeddings have dim {img.shape[1]}, classes {cls.shape[1]}")
    logits = float(logit_scale) * (img @ cls.T)
    if logit_bias is not None:
        logits = logits + float(logit_bias)
    sigmoid = activation == "sigmoid" or (activation == "auto"
                                          and (multilabel or logit_bias is not None))
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
    return probs.cpu().numpy()


def distractor_accuracy(image_emb: Any, class_text_emb: Any, y: Any, n_distractors: int = 9,
                        seed: int = 0, device: Any = None) -> dict[str, Any]:
    """Top-1 accuracy of the true class description against random other classes.

    Each image (class index ``y``; -1 skipped) is scored against its class text and
    ``n_distractors`` distinct other classes drawn at random (capped at C - 1); correct when
    the true class scores strictly highest.
    """
    dev = _device(device, image_emb)
    img = normalize(image_emb, dev, "image embeddings")
    cls = class_embeddings(class_text_emb, dev)
    c = cls.shape[0]
    y = np.asarray(y).astype(np.int64)
    if y.shape != (img.shape[0],):
        raise DataError(f"{len(y)} labels for {img.shape[0]} images")
    if y.size and y.max() >= c:
        raise DataError(f"class index {int(y.max())} out of range for {c} class texts")
    if c < 2:
        raise DataError("distractor accuracy needs at least 2 classes")
    k = min(int(n_distractors), c - 1)
    if k < 1:
        raise ConfigError(f"n_distractors must be >= 1, got {n_distractors}")
    keep = np.nonzero(y >= 0)[0]
    scores = (img[torch.from_numpy(keep).to(dev)] @ cls.T).cpu().numpy()
    yk = y[keep]
    keys = np.random.default_rng(seed).random((len(keep), c))
    rows = np.arange(len(keep))
    keys[rows, yk] = 2.0  # never drawn
    drawn = np.argpartition(keys, k - 1, axis=1)[:, :k] if len(keep) else np.zeros((0, k), int)
    correct = scores[rows, yk] > np.take_along_axis(scores, drawn, axis=1).max(axis=1, initial=-2)
    return {"accuracy": float(correct.mean()) if len(keep) else float("nan"),
            "chance": 1.0 / (k + 1), "n_distractors": k, "n": int(len(keep)),
            "n_missing": int(len(y) - len(keep))}
