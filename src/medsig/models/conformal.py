"""Split-conformal prediction sets per head, calibrated on val (Vovk; Angelopoulos & Bates).

Score of an image for its true class: ``1 - P(true class)`` (binary heads: the two states
[negative, positive] with probabilities [1 - p, p]; multilabel: each class on its own as a
binary head). With ``n`` val scores the threshold ``qhat`` is the ``ceil((n + 1)(1 - alpha))``
-th smallest; a class is in the set when ``1 - P(class) <= qhat``. For an exchangeable test
image the set holds its true class with probability >= 1 - alpha (marginally). A set of one
class is a confident answer; any other size (both states, several classes, or none) means
"uncertain - needs review".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medsig.errors import ConfigError
from medsig.models.heads import Head

DEFAULT_ALPHA = 0.1


def conformal_quantile(scores: Any, alpha: float) -> float:
    """The split-conformal threshold of calibration scores at error rate ``alpha``
    (``inf`` when there are too few scores for that guarantee: every class is in the set)."""
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"conformal alpha must be in (0, 1), got {alpha!r}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * (1.0 - float(alpha)))
    return float("inf") if k > len(s) else float(s[k - 1])


def class_probs(h: Head, block: np.ndarray) -> list[np.ndarray]:
    """(n, C) class-probability matrices of a head, one per conformal output: binary
    [[1-p, p]], multilabel one [1-p, p] per class, multiclass the softmax slice."""
    block = np.asarray(block, dtype=np.float64)
    if h.kind == "multiclass":
        return [block]
    return [np.stack([1.0 - block[:, j], block[:, j]], axis=1) for j in range(h.size)]


def _alpha(alpha: float | Mapping[str, float], name: str) -> float:
    if isinstance(alpha, Mapping):
        return float(alpha.get(name, alpha.get("default", DEFAULT_ALPHA)))
    return float(alpha)


def fit_conformal(heads: Sequence[Any], targets: Mapping[str, np.ndarray], probs: np.ndarray,
                  alpha: float | Mapping[str, float] = DEFAULT_ALPHA) -> dict[str, dict]:
    """{head: {"alpha", "qhat": [per conformal output], "n"}} from (calibrated) val
    probabilities; ``alpha`` is one rate or {label: rate} (others: 0.1, or key "default")."""
    from medsig.models.calibration import head_targets

    out: dict[str, dict] = {}
    for h in map(Head.of, heads):
        if h.name not in targets:
            continue
        a = _alpha(alpha, h.name)
        qs, ns = [], []
        for y, p in zip(head_targets(h, targets[h.name]), class_probs(h, probs[:, h.cols])):
            keep = np.asarray(y) >= 0
            yk = np.asarray(y)[keep].astype(np.int64)
            scores = 1.0 - p[keep][np.arange(len(yk)), yk]
            qs.append(conformal_quantile(scores, a))
            ns.append(int(len(yk)))
        out[h.name] = {"alpha": a, "qhat": [round(q, 6) if math.isfinite(q) else None
                                            for q in qs], "n": min(ns) if ns else 0}
    return out


def prediction_sets(h: Head, entry: Mapping[str, Any], block: np.ndarray
                    ) -> list[np.ndarray]:
    """Boolean (n, C) membership per conformal output of head ``h`` (C = 2 for binary /
    multilabel outputs: [negative, positive])."""
    out = []
    for q, p in zip(entry["qhat"], class_probs(h, block)):
        q = float("inf") if q is None else float(q)
        out.append((1.0 - p) <= q + 1e-12)
    return out


def coverage(h: Head, entry: Mapping[str, Any], targets: np.ndarray, block: np.ndarray
             ) -> dict[str, float]:
    """Empirical coverage, abstention rate (set size != 1) and mean set size on labelled
    rows (pooled over a multilabel head's classes)."""
    from medsig.models.calibration import head_targets

    hit, abstain, size = [], [], []
    for y, member in zip(head_targets(h, targets), prediction_sets(h, entry, block)):
        keep = np.asarray(y) >= 0
        yk = np.asarray(y)[keep].astype(np.int64)
        m = member[keep]
        hit.append(m[np.arange(len(yk)), yk])
        n_in = m.sum(axis=1)
        abstain.append(n_in != 1)
        size.append(n_in)
    hits = np.concatenate(hit) if hit else np.zeros(0)
    n = int(len(hits))
    return {"alpha": float(entry["alpha"]), "target": 1.0 - float(entry["alpha"]), "n": n,
            "coverage": float(hits.mean()) if n else float("nan"),
            "abstention": float(np.concatenate(abstain).mean()) if n else float("nan"),
            "mean_set_size": float(np.concatenate(size).mean()) if n else float("nan")}
