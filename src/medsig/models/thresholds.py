"""Decision thresholds per label: Youden's J or a minimum sensitivity.

Convention (as in serving): a score is called positive when ``score >= threshold``.
Targets use the contract encoding: 1 / 0, and -1 (missing) is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medsig.errors import ConfigError, DataError

DEFAULT_THRESHOLD = 0.5


def binary_arrays(y: Any, scores: Any, what: str = "binary targets") -> tuple[np.ndarray, ...]:
    """Validated (y, scores) with -1 rows dropped; y as int8 in {0, 1}."""
    y = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise DataError(f"{what}: targets {y.shape} and scores {s.shape} must be equal 1-D shapes")
    if y.size and not np.isin(y, (-1, 0, 1)).all():
        bad = y[~np.isin(y, (-1, 0, 1))][0]
        raise DataError(f"{what}: target value {bad!r} is not 1, 0 or -1 (missing)")
    keep = y != -1
    y, s = y[keep].astype(np.int8), s[keep]
    if not np.isfinite(s).all():
        raise DataError(f"{what}: scores contain NaN or infinite values")
    return y, s


def youden_threshold(y: Any, scores: Any, default: float = DEFAULT_THRESHOLD) -> float:
    """Threshold maximising J = sensitivity + specificity - 1 (the highest one on ties).

    Returns ``default`` when only one class is present (no evidence for a cut-off).
    """
    y, s = binary_arrays(y, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float(default)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.arange(1, len(s) + 1) - tp
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # end of each run of equal scores
    j = tp[last] / n_pos - fp[last] / n_neg
    return float(s_sorted[last][int(np.argmax(j))])


def threshold_for_sensitivity(y: Any, scores: Any, min_sensitivity: float,
                              default: float = DEFAULT_THRESHOLD) -> float:
    """The highest threshold whose sensitivity is at least ``min_sensitivity``.

    Returns ``default`` when there are no positives.
    """
    if not 0.0 < float(min_sensitivity) <= 1.0:
        raise ConfigError(f"minimum sensitivity must be in (0, 1], got {min_sensitivity!r}")
    y, s = binary_arrays(y, scores)
    pos = np.sort(s[y == 1])[::-1]
    if len(pos) == 0:
        return float(default)
    k = max(1, math.ceil(float(min_sensitivity) * len(pos) - 1e-9))  # positives needed
    return float(pos[k - 1])


def _rule_for(rule: Any, j: int, name: str) -> float | None:
    """Minimum sensitivity for label j (None = Youden)."""
    if isinstance(rule, str):
        if rule != "youden":
            raise ConfigError(f"threshold rule must be 'youden' or {{label: min sensitivity}}, "
                              f"got {rule!r}")
        return None
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return float(rule)
    if isinstance(rule, Mapping):
        value = rule.get(name, rule.get(j))  # type: ignore[call-overload]
        return None if value is None else float(value)
    raise ConfigError(f"threshold rule must be 'youden', a sensitivity or a mapping, got {rule!r}")


def choose_thresholds(targets: Any, scores: Any, rule: Any = "youden",
                      names: Sequence[str] | None = None,
                      default: float = DEFAULT_THRESHOLD) -> list[float]:
    """One threshold per column of ``targets`` / ``scores`` (n, L); -1 entries are masked.

    ``rule``: "youden" for all labels; a float = minimum sensitivity for all labels; or a
    mapping {label name or column index: minimum sensitivity} (labels not in it use Youden).
    """
    t = np.asarray(targets)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim == 1:
        t, s = t[:, None], s.reshape(-1, 1) if s.ndim == 1 else s
    if t.ndim != 2 or s.shape != t.shape:
        raise DataError(f"targets {t.shape} and scores {s.shape} must have the same (n, L) shape")
    names = list(names) if names is not None else [str(j) for j in range(t.shape[1])]
    if len(names) != t.shape[1]:
        raise DataError(f"{len(names)} names for {t.shape[1]} label columns")
    if isinstance(rule, Mapping):
        unknown = [k for k in rule if k not in names and k not in range(t.shape[1])]
        if unknown:
            listed = ", ".join(map(str, unknown))
            raise ConfigError(f"threshold rule names unknown labels: {listed}")
    out = []
    for j, name in enumerate(names):
        sens = _rule_for(rule, j, name)
        if sens is None:
            out.append(youden_threshold(t[:, j], s[:, j], default))
        else:
            out.append(threshold_for_sensitivity(t[:, j], s[:, j], sens, default))
    return out


def rule_names(rule: Any, names: Sequence[str]) -> list[str]:
    """Readable rule per label, as saved in medsig.json ("youden" / "sensitivity>=0.9")."""
    out = []
    for j, name in enumerate(names):
        sens = _rule_for(rule, j, name)
        out.append("youden" if sens is None else f"sensitivity>={sens:g}")
    return out


def head_thresholds(heads: Sequence[Any], targets: Sequence[Any], probs: Any,
                    rule: Any = "youden") -> list[Any]:
    """Heads (``medsig.models.heads.Head``) with thresholds chosen on validation data.

    ``targets[i]``: head i's (n, size) 0/1 targets (-1 missing, ``Head.onehot``); ``probs``:
    (n, K) probabilities of every head. Binary / multilabel outputs get ``choose_thresholds``
    under the head's rule ("youden", a minimum sensitivity, or {label: min sensitivity} with
    Youden for the others); multiclass heads get none (argmax decides). An output whose
    targets hold one class keeps ``DEFAULT_THRESHOLD`` (no evidence for a cut-off).
    """
    probs = np.asarray(probs, dtype=np.float64)
    out = []
    for h, y in zip(heads, targets):
        if h.kind == "multiclass":
            out.append(h.with_thresholds([], "argmax"))
            continue
        label_rule = rule.get(h.name, "youden") if isinstance(rule, Mapping) else rule
        y = np.asarray(y)
        chosen = choose_thresholds(y, probs[:, h.cols], label_rule, [h.name] * h.size)
        one_class = [len(set(y[y[:, j] >= 0, j].tolist())) < 2 for j in range(h.size)]
        chosen = [DEFAULT_THRESHOLD if one else t for t, one in zip(chosen, one_class)]
        out.append(h.with_thresholds(chosen, rule_names(label_rule, [h.name])[0]))
    return out
