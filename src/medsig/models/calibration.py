"""Temperature scaling per head, fitted on val (Guo et al. 2017).

Works on the probabilities a predictor returns (heads concatenated, see ``models.heads``):
binary and multilabel outputs are sigmoids, so ``p' = sigmoid(logit(p) / T)`` with one
temperature per output; a multiclass head is a softmax slice, so ``p' = softmax(log p / T)``
with one temperature per head. ``T`` minimises the negative log-likelihood of the val
targets (missing targets, -1, are ignored); ``T = 1`` when a head has no usable target.
Scaling by ``T`` keeps every ranking (AUC) and the argmax, and is exactly invertible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from medsig.models.heads import Head

EPS = 1e-7
T_RANGE = (0.05, 20.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scale_probs(p: np.ndarray, kind: str, t: float) -> np.ndarray:
    """Probabilities of one output (binary / multilabel column) or one multiclass slice at
    temperature ``t``."""
    p = np.asarray(p, dtype=np.float64)
    if kind == "multiclass":
        return _softmax(np.log(np.clip(p, EPS, 1.0)) / t)
    return _sigmoid(_logit(p) / t)


def _nll(y: np.ndarray, p: np.ndarray, kind: str) -> float:
    if kind == "multiclass":
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(y: Any, p: Any, kind: str) -> float:
    """The NLL-optimal temperature for targets ``y`` (binary 0/1/-1, or class index / -1)
    and probabilities ``p`` ((n,) for a sigmoid output, (n, C) for a multiclass slice)."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    keep = y >= 0
    y, p = y[keep].astype(np.int64), p[keep]
    if len(y) < 2 or (kind != "multiclass" and len(np.unique(y)) < 2):
        return 1.0
    res = minimize_scalar(lambda lt: _nll(y, scale_probs(p, kind, float(np.exp(lt))), kind),
                          bounds=tuple(np.log(T_RANGE)), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    # never worse than no scaling (the bounded search can stop in a flat region)
    return t if _nll(y, scale_probs(p, kind, t), kind) <= _nll(y, p, kind) else 1.0


def head_targets(h: Head, targets: np.ndarray) -> list[np.ndarray]:
    """A head's targets as one array per temperature: per output (binary / multilabel) or
    the class index (multiclass)."""
    t = np.asarray(targets)
    if h.kind == "multilabel":
        return [t[:, j] for j in range(h.size)]
    return [t.reshape(-1)]


def fit_calibration(heads: Sequence[Any], targets: Mapping[str, np.ndarray],
                    probs: np.ndarray) -> dict[str, list[float]]:
    """Temperatures {head name: [T per output] (multiclass: [T])} from val probabilities;
    heads without targets keep T = 1."""
    out: dict[str, list[float]] = {}
    for h in map(Head.of, heads):
        block = np.asarray(probs)[:, h.cols]
        if h.name not in targets:
            out[h.name] = [1.0] * (1 if h.kind == "multiclass" else h.size)
            continue
        ys = head_targets(h, targets[h.name])
        if h.kind == "multiclass":
            out[h.name] = [round(fit_temperature(ys[0], block, h.kind), 6)]
        else:
            out[h.name] = [round(fit_temperature(y, block[:, j], h.kind), 6)
                           for j, y in enumerate(ys)]
    return out


def apply_calibration(heads: Sequence[Any], temps: Mapping[str, Sequence[float]],
                      probs: Any, invert: bool = False) -> np.ndarray:
    """Calibrated probabilities (same layout); ``invert`` undoes the scaling exactly."""
    p = np.asarray(probs, dtype=np.float64).copy()
    for h in map(Head.of, heads):
        ts = temps.get(h.name)
        if not ts:
            continue
        if h.kind == "multiclass":
            t = float(ts[0])
            p[:, h.cols] = scale_probs(p[:, h.cols], h.kind, 1.0 / t if invert else t)
            continue
        for j, t in enumerate(ts):
            col = h.offset + j
            p[:, col] = scale_probs(p[:, col], h.kind, 1.0 / float(t) if invert else float(t))
    return p.astype(np.float32)
