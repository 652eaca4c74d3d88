"""Probability calibration per head, fitted on val: Platt scaling for sigmoid outputs,
temperature scaling for softmax heads (Platt 1999; Guo et al. 2017).

Works on the probabilities a predictor returns (heads concatenated, see ``models.heads``).
Every output (binary, each multilabel class) or multiclass head gets a pair ``(a, b)``:

- binary / multilabel output: ``p' = sigmoid(a * logit(p) + b)`` (Platt). ``b`` undoes a
  shifted base rate (e.g. a classifier trained with a positive-class weight), ``a`` over- or
  under-confidence;
- multiclass head: ``p' = softmax(a * log p)`` (temperature ``T = 1 / a``; ``b`` is 0): a
  softmax has no single bias to move.

``(a, b)`` minimise the negative log-likelihood of the val targets (missing targets, -1,
are ignored); ``(1, 0)`` when a head has no usable targets or fitting does not help. With
``a > 0`` the map is increasing: it keeps every ranking (AUC), the argmax, and maps each
threshold to the one giving the same decisions; it is exactly invertible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize

from medsig.models.heads import Head

EPS = 1e-7
IDENTITY = (1.0, 0.0)
A_RANGE = (0.05, 20.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def transform(p: Any, kind: str, a: float, b: float = 0.0, invert: bool = False
              ) -> np.ndarray:
    """Calibrated probabilities of one sigmoid output (n,) or one multiclass slice (n, C)
    (``invert``: back to the raw ones)."""
    p = np.asarray(p, dtype=np.float64)
    if kind == "multiclass":
        return _softmax(np.log(np.clip(p, EPS, 1.0)) * (1.0 / a if invert else a))
    z = _logit(p)
    return _sigmoid((z - b) / a if invert else a * z + b)


def _nll(y: np.ndarray, p: np.ndarray, kind: str) -> float:
    if kind == "multiclass":
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_scaling(y: Any, p: Any, kind: str) -> tuple[float, float]:
    """NLL-optimal ``(a, b)`` for targets ``y`` (0 / 1 / -1, or class index / -1) and raw
    probabilities ``p`` ((n,) sigmoid output or (n, C) multiclass slice)."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    keep = y >= 0
    y, p = y[keep].astype(np.int64), p[keep]
    if len(y) < 2 or (kind != "multiclass" and len(np.unique(y)) < 2):
        return IDENTITY
    lo, hi = np.log(A_RANGE)
    if kind == "multiclass":
        def loss(x: np.ndarray) -> float:
            return _nll(y, transform(p, kind, float(np.exp(x[0]))), kind)

        res = minimize(loss, np.zeros(1), method="L-BFGS-B", bounds=[(lo, hi)])
        a, b = float(np.exp(res.x[0])), 0.0
    else:
        z = _logit(p)

        def loss(x: np.ndarray) -> float:
            return _nll(y, _sigmoid(np.exp(x[0]) * z + x[1]), kind)

        res = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=[(lo, hi), (-20, 20)])
        a, b = float(np.exp(res.x[0])), float(res.x[1])
    better = _nll(y, transform(p, kind, a, b), kind) <= _nll(y, p, kind)
    return (round(a, 6), round(b, 6)) if better else IDENTITY


def head_targets(h: Head, targets: np.ndarray) -> list[np.ndarray]:
    """A head's targets as one array per fitted output: per output (binary / multilabel) or
    the class index (multiclass)."""
    t = np.asarray(targets)
    if h.kind == "multilabel":
        return [t[:, j] for j in range(h.size)]
    return [t.reshape(-1)]


def fit_calibration(heads: Sequence[Any], targets: Mapping[str, np.ndarray],
                    probs: np.ndarray) -> dict[str, list[list[float]]]:
    """{head name: [[a, b] per output] (multiclass: one pair)} from raw val probabilities;
    heads without targets keep the identity."""
    out: dict[str, list[list[float]]] = {}
    for h in map(Head.of, heads):
        block = np.asarray(probs)[:, h.cols]
        n = 1 if h.kind == "multiclass" else h.size
        if h.name not in targets:
            out[h.name] = [list(IDENTITY) for _ in range(n)]
            continue
        ys = head_targets(h, targets[h.name])
        if h.kind == "multiclass":
            out[h.name] = [list(fit_scaling(ys[0], block, h.kind))]
        else:
            out[h.name] = [list(fit_scaling(y, block[:, j], h.kind)) for j, y in enumerate(ys)]
    return out


def apply_calibration(heads: Sequence[Any], params: Mapping[str, Sequence[Sequence[float]]],
                      probs: Any, invert: bool = False) -> np.ndarray:
    """Calibrated probabilities (same layout); ``invert`` undoes the calibration exactly."""
    p = np.asarray(probs, dtype=np.float64).copy()
    for h in map(Head.of, heads):
        pairs = params.get(h.name)
        if not pairs:
            continue
        if h.kind == "multiclass":
            a, b = pairs[0]
            p[:, h.cols] = transform(p[:, h.cols], h.kind, a, b, invert)
            continue
        for j, (a, b) in enumerate(pairs):
            col = h.offset + j
            p[:, col] = transform(p[:, col], h.kind, a, b, invert)
    return p.astype(np.float32)
