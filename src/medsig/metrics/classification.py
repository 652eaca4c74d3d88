"""Classification metrics: binary, multilabel, multiclass, calibration.

Targets follow the contract (-1 = missing, excluded). Undefined values (e.g. AUC with one
class present, PPV with no positive calls) are NaN, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from medsig.errors import DataError
from medsig.models.thresholds import binary_arrays

NAN = float("nan")
THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else NAN


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none), without a RuntimeWarning."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else NAN


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney) statistic, ties averaged; NaN if one class."""
    y = np.asarray(y)
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall, as scikit-learn)."""
    y = np.asarray(y)
    n_pos = int((y == 1).sum())
    if n_pos == 0 or n_pos == len(y):
        return NAN
    order = np.argsort(-np.asarray(s), kind="stable")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted == 1)[last]
    called = np.arange(1, len(y) + 1)[last]
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * tp / called))


def binary_metrics(y: Any, scores: Any, threshold: float = 0.5) -> dict[str, float]:
    """AUC, AP and threshold metrics (``score >= threshold`` is positive); -1 rows excluded."""
    y_all = np.asarray(y)
    y, s = binary_arrays(y_all, scores)
    n_missing = int(y_all.size - y.size)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    pred = s >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn, tn = n_pos - tp, n_neg - fp
    both = n_pos > 0 and n_neg > 0
    return {
        "roc_auc": roc_auc(y, s) if both else NAN,
        "average_precision": average_precision(y, s) if both else NAN,
        "sensitivity": _div(tp, n_pos),
        "specificity": _div(tn, n_neg),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "accuracy": _div(tp + tn, len(y)),
        "threshold": float(threshold),
        "n": int(len(y)),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_missing": n_missing,
    }


def multilabel_metrics(targets: Any, scores: Any, class_names: Sequence[str],
                       thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Per-label binary metrics at the saved thresholds (or 0.5) and at 0.5, plus averages.

    Returns {"per_label": {name: metrics + {"at_0.5": threshold metrics}}, "macro": ...,
    "macro_at_0.5": ..., "micro": {"roc_auc", "average_precision"}, "n_rows"}.
    Macro = mean over labels where the value is defined.
    """
    t = np.asarray(targets)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or s.shape != t.shape:
        raise DataError(f"multilabel targets {t.shape} and scores {s.shape} must match (n, C)")
    names = list(class_names)
    if len(names) != t.shape[1]:
        raise DataError(f"{len(names)} class names for {t.shape[1]} label columns")
    if thresholds is not None and len(thresholds) != len(names):
        raise DataError(f"{len(thresholds)} thresholds for {len(names)} labels")
    per: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        thr = 0.5 if thresholds is None else float(thresholds[j])
        m: dict[str, Any] = binary_metrics(t[:, j], s[:, j], thr)
        at05 = binary_metrics(t[:, j], s[:, j], 0.5) if thr != 0.5 else m
        m["at_0.5"] = {k: at05[k] for k in THRESHOLD_METRICS}
        per[name] = m
    keys = ("roc_auc", "average_precision") + THRESHOLD_METRICS
    macro = {k: nanmean([per[n][k] for n in names]) for k in keys}
    macro_05 = {k: nanmean([per[n]["at_0.5"][k] for n in names]) for k in THRESHOLD_METRICS}
    keep = t != -1
    yk, sk = t[keep].astype(np.int8), s[keep]
    both = 0 < yk.sum() < yk.size
    micro = {"roc_auc": roc_auc(yk, sk) if both else NAN,
             "average_precision": average_precision(yk, sk) if both else NAN}
    rows = int((keep.any(axis=1)).sum())
    return {"per_label": per, "macro": macro, "macro_at_0.5": macro_05, "micro": micro,
            "n_rows": rows, "n_missing_rows": int(t.shape[0] - rows)}


def multiclass_metrics(y: Any, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro P/R/F1, one-vs-rest AUC per class, confusion matrix.

    Prediction = argmax of ``probs`` (n, C). Rows with y == -1 are excluded. Macro precision /
    recall / F1 average over classes that occur in the targets or the predictions (as
    scikit-learn), with 0 for an undefined ratio; balanced accuracy averages recall over
    classes present in the targets.
    """
    y_all = np.asarray(y)
    p = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    c = len(names)
    if y_all.ndim != 1 or p.ndim != 2 or p.shape != (len(y_all), c):
        raise DataError(f"multiclass targets {y_all.shape} and probabilities {p.shape} must be "
                        f"(n,) and (n, {c})")
    if y_all.size and (y_all.min() < -1 or y_all.max() >= c):
        raise DataError(f"class index out of range [-1, {c - 1}] in multiclass targets")
    keep = y_all != -1
    yk, pk = y_all[keep].astype(np.int64), p[keep]
    if not np.isfinite(pk).all():
        raise DataError("multiclass probabilities contain NaN or infinite values")
    pred = pk.argmax(axis=1) if len(yk) else np.zeros(0, np.int64)
    cm = np.bincount(yk * c + pred, minlength=c * c).reshape(c, c)
    true_n, pred_n, diag = cm.sum(1), cm.sum(0), np.diag(cm)
    present = (true_n + pred_n) > 0
    recall = np.where(true_n > 0, diag / np.maximum(true_n, 1), 0.0)
    precision = np.where(pred_n > 0, diag / np.maximum(pred_n, 1), 0.0)
    f1 = np.where(present, 2 * diag / np.maximum(true_n + pred_n, 1), 0.0)
    per_class = {}
    for k, name in enumerate(names):
        per_class[name] = {
            "roc_auc_ovr": roc_auc((yk == k).astype(np.int8), pk[:, k]),
            "precision": float(precision[k]) if pred_n[k] else NAN,
            "recall": float(recall[k]) if true_n[k] else NAN,
            "f1": float(f1[k]) if present[k] else NAN,
            "support": int(true_n[k]),
        }
    n = len(yk)
    return {
        "accuracy": _div(diag.sum(), n),
        "balanced_accuracy": float(recall[true_n > 0].mean()) if n else NAN,
        "macro_precision": float(precision[present].mean()) if present.any() else NAN,
        "macro_recall": float(recall[present].mean()) if present.any() else NAN,
        "macro_f1": float(f1[present].mean()) if present.any() else NAN,
        "macro_roc_auc_ovr": nanmean([per_class[k]["roc_auc_ovr"] for k in names]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": names,
        "n": n,
        "n_missing": int(y_all.size - n),
    }


def calibration(y: Any, prob: Any, n_bins: int = 10) -> dict[str, Any]:
    """Expected / maximum calibration error, Brier score and reliability-diagram bins.

    Binary: ``y`` in {1, 0, -1}, ``prob`` (n,) = P(positive). Multiclass: ``y`` class index,
    ``prob`` (n, C): top-label calibration (confidence = max prob, correct = argmax == y).
    Equal-width bins on [0, 1]; a value on an inner edge goes to the lower bin (as
    scikit-learn's ``calibration_curve``).
    """
    y_all = np.asarray(y)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2:
        if p.shape[0] != y_all.shape[0]:
            raise DataError(f"targets {y_all.shape} and probabilities {p.shape} differ in rows")
        keep = y_all != -1
        if keep.any() and (y_all[keep].min() < 0 or y_all[keep].max() >= p.shape[1]):
            raise DataError(f"class index out of range [-1, {p.shape[1] - 1}] in targets")
        conf = p[keep].max(axis=1)
        hit = (p[keep].argmax(axis=1) == y_all[keep]).astype(np.float64)
        brier = float(np.mean(((np.eye(p.shape[1])[y_all[keep]] - p[keep]) ** 2).sum(1))) \
            if keep.any() else NAN
    else:
        yb, conf = binary_arrays(y_all, p, "calibration targets")
        hit = yb.astype(np.float64)
        brier = float(np.mean((conf - hit) ** 2)) if len(conf) else NAN
    if len(conf) and (conf.min() < 0 or conf.max() > 1):
        raise DataError("probabilities must lie in [0, 1] for calibration")
    if n_bins < 1:
        raise DataError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    count = np.bincount(ids, minlength=n_bins)
    sum_conf = np.bincount(ids, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(ids, weights=hit, minlength=n_bins)
    bins = []
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        mean_conf = sum_conf[b] / count[b] if count[b] else NAN
        frac = sum_hit[b] / count[b] if count[b] else NAN
        if count[b]:
            gap = abs(frac - mean_conf)
            ece += count[b] / len(conf) * gap
            mce = max(mce, gap)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
                     "mean_confidence": float(mean_conf), "fraction_positive": float(frac)})
    n = int(len(conf))
    return {"ece": float(ece) if n else NAN, "mce": float(mce) if n else NAN, "brier": brier,
            "n_bins": n_bins, "bins": bins, "n": n}
