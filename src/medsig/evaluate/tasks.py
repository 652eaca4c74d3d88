"""The four evaluation tasks on one model's outputs, and the headline-metric registry.

Each task returns its metrics dict and registers its headline metrics (a metric function
plus per-row arrays) in a ``Headlines`` so that run.py can bootstrap them by group, pair
models and slice by subgroup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from medsig.data.collection import Collection
from medsig.errors import DataError
from medsig.metrics.classification import (
    THRESHOLD_METRICS,
    binary_metrics,
    calibration,
    multiclass_metrics,
    multilabel_metrics,
    nanmean,
    roc_auc,
)
from medsig.metrics.clustering import clustering_metrics
from medsig.metrics.retrieval import (
    batchwise_recall,
    distractor_accuracy,
    retrieval_ranks,
    summarize_ranks,
)

KS = (1, 5, 10)


@dataclass
class ModelOutputs:
    """What one model produced for the split rows it could read (``rows``)."""

    rows: np.ndarray
    image: np.ndarray
    text: np.ndarray | None = None
    probs: np.ndarray | None = None
    zeroshot: dict[str, np.ndarray] = field(default_factory=dict)
    class_text: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    image_stats: np.ndarray | None = None  # (n, d) medsig.data.image_stats, for the OOD gate

    def take(self, idx: np.ndarray) -> ModelOutputs:
        """Rows at positions ``idx`` of this output."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return ModelOutputs(self.rows[idx], self.image[idx], pick(self.text), pick(self.probs),
                            {k: v[idx] for k, v in self.zeroshot.items()}, self.class_text,
                            self.info, pick(self.image_stats))


# -- labels ------------------------------------------------------------------------------------
def main_label(col: Collection) -> str | None:
    """The first multiclass / multilabel label (positives, distractors, clustering colour)."""
    return next((k for k, v in col.labels.items() if v.kind != "binary" and v.parent is None),
                next((k for k, v in col.labels.items() if v.kind != "binary"), None))


def primary_class(col: Collection, name: str) -> np.ndarray:
    """Class index per row (-1 none): multilabel = highest weight (else first positive)."""
    lab = col.labels[name]
    if lab.kind != "multilabel":
        return np.asarray(lab.targets, dtype=np.int64)
    pos = lab.targets > 0
    score = np.where(pos, lab.weights if lab.weights is not None else 1.0, -np.inf)
    return np.where(pos.any(axis=1), score.argmax(axis=1), -1).astype(np.int64)


def _indicator(col: Collection, name: str) -> np.ndarray:
    """(n, K) 0/1 targets per output (-1 missing); multiclass one-vs-rest."""
    lab = col.labels[name]
    if lab.kind == "binary":
        return np.asarray(lab.targets, dtype=np.int8)[:, None]
    if lab.kind == "multilabel":
        return np.asarray(lab.targets, dtype=np.int8)
    y = np.full((len(lab.targets), len(lab.classes)), -1, np.int8)
    ok = lab.targets >= 0
    y[ok] = 0
    y[np.nonzero(ok)[0], lab.targets[ok]] = 1
    return y


# -- headline registry -------------------------------------------------------------------------
class Headlines:
    """metric -> model -> (metric_fn, per-row arrays, key, bias_correct).

    Models with equal keys can be paired; ``bias_correct`` marks statistics that bootstrap
    resamples inflate (NMI: duplicated rows look like tighter clusters).
    """

    def __init__(self) -> None:
        self.items: dict[str, dict[str, tuple[Callable[..., float], tuple, Any, bool]]] = {}

    def add(self, metric: str, model: str, fn: Callable[..., float], arrays: tuple,
            key: Any = None, bias_correct: bool = False) -> None:
        self.items.setdefault(metric, {})[model] = (fn, arrays, key, bias_correct)


def _macro_auc_fn(parts: list[tuple[int, int]]) -> Callable[..., float]:
    """Mean over labels of the mean per-output ROC AUC (rows with missing targets excluded).

    The rank-sum statistic of ``classification.roc_auc`` (ties averaged), vectorised over a
    label's outputs because the bootstrap calls it thousands of times.
    """
    def fn(y: np.ndarray, s: np.ndarray) -> float:
        per_label = []
        for a, b in parts:
            keep = (y[:, a:b] >= 0).all(axis=1)
            yy, ss = y[keep, a:b] == 1, s[keep, a:b]
            n_pos = yy.sum(axis=0).astype(np.float64)
            n_neg = len(yy) - n_pos
            ranks = rankdata(ss, axis=0) if len(yy) else np.zeros(ss.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                auc = ((ranks * yy).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            per_label.append(nanmean(np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)))
        return nanmean(per_label)
    return fn


def _mean_of_columns(c: np.ndarray) -> float:
    return nanmean([nanmean(c[:, j]) for j in range(c.shape[1])])


def _recall_fn(k: int) -> Callable[..., float]:
    def fn(ranks: np.ndarray) -> float:
        r = ranks[ranks > 0]
        return float((r <= k).mean()) if r.size else float("nan")
    return fn


def _nmi(y: np.ndarray, c: np.ndarray) -> float:
    """NMI (arithmetic normalisation, as scikit-learn) from the contingency table; y < 0 dropped."""
    keep = y >= 0
    _, yi = np.unique(y[keep], return_inverse=True)
    _, ci = np.unique(c[keep], return_inverse=True)
    if yi.size == 0 or (yi.max() == 0 and ci.max() == 0):
        return 1.0
    cont = np.zeros((yi.max() + 1, ci.max() + 1))
    np.add.at(cont, (yi, ci), 1.0)
    p = cont / cont.sum()
    py, pc = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(py, pc)[nz])).sum())
    h = (-(py * np.log(py)).sum() - (pc * np.log(pc)).sum()) / 2
    return 0.0 if mi <= 0 else float(mi / h)


def _roc_points(y: np.ndarray, s: np.ndarray, n: int = 101) -> dict[str, Any] | None:
    """Micro-averaged ROC (all outputs pooled) on a fixed FPR grid."""
    from sklearn.metrics import roc_curve

    keep = y >= 0
    y, s = y[keep].astype(np.int8), s[keep].astype(np.float64)
    if y.size == 0 or y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, s)
    grid = np.linspace(0.0, 1.0, n)
    return {"fpr": grid.round(4).tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist(),
            "auc": roc_auc(y, s)}


# -- tasks -------------------------------------------------------------------------------------
def _label_metrics(col: Collection, name: str, p: np.ndarray,
                   thresholds: Sequence[float] | None) -> dict[str, Any]:
    lab = col.labels[name]
    if lab.kind == "binary":
        thr = float(thresholds[0]) if thresholds else 0.5
        m = binary_metrics(lab.targets, p[:, 0], thr)
        at05 = binary_metrics(lab.targets, p[:, 0], 0.5)
        m["at_0.5"] = {k: at05[k] for k in THRESHOLD_METRICS}
        m["calibration"] = calibration(lab.targets, p[:, 0])
        return {"kind": "binary", **m}
    if lab.kind == "multilabel":
        return {"kind": "multilabel",
                **multilabel_metrics(lab.targets, p, lab.classes, thresholds or None)}
    return {"kind": "multiclass", **multiclass_metrics(lab.targets, p, lab.classes),
            "calibration": calibration(lab.targets, p)}


def _scored(col: Collection, per_label: dict[str, np.ndarray], hl: Headlines, model: str,
            metric: str, roc: dict[str, Any]) -> None:
    """Register the macro AUC of label score blocks and store their ROC curves."""
    ys, ss, parts, at = [], [], [], 0
    for name, s in per_label.items():
        y = _indicator(col, name)
        ys.append(y)
        ss.append(s)
        parts.append((at, at + y.shape[1]))
        at += y.shape[1]
        roc.setdefault(name, {})[model] = _roc_points(y, s)
    if parts:
        hl.add(metric, model, _macro_auc_fn(parts), (np.hstack(ys), np.hstack(ss)),
               tuple(per_label))


def classification(col: Collection, out: ModelOutputs, hl: Headlines, model: str,
                   roc: dict[str, Any]) -> dict[str, Any]:
    if out.probs is None:
        return {"skipped": "no classification heads (train a classifier or a probe)"}
    labels, scores = {}, {}
    for h in out.info["heads"]:
        if h["name"] not in col.labels:
            labels[h["name"]] = {"skipped": "label not in this spec"}
            continue
        p = out.probs[:, int(h["offset"]):int(h["offset"]) + int(h["size"])]
        labels[h["name"]] = _label_metrics(col, h["name"], p, h.get("thresholds"))
        scores[h["name"]] = p
    _scored(col, scores, hl, model, "classification/macro_auc", roc)
    return {"labels": labels}


def zeroshot(col: Collection, out: ModelOutputs, hl: Headlines, model: str,
             roc: dict[str, Any]) -> dict[str, Any]:
    if not out.zeroshot:
        return {"skipped": "image-only model: no text encoder for zero-shot"}
    labels, scores, correct = {}, {}, []
    for name, p in out.zeroshot.items():
        lab = col.labels[name]
        s = p[:, 1:2] if lab.kind == "binary" else p
        labels[name] = _label_metrics(col, name, s, None)
        pred = p.argmax(axis=1)
        if lab.kind == "multilabel":
            ok = (lab.targets > 0).any(axis=1)
            hit = lab.targets[np.arange(len(pred)), pred] == 1
        else:
            ok, hit = lab.targets >= 0, pred == lab.targets
        correct.append(np.where(ok, hit.astype(np.float64), np.nan))
        labels[name]["top1_accuracy"] = nanmean(correct[-1])
        scores[name] = s
    hl.add("zeroshot/accuracy", model, _mean_of_columns, (np.stack(correct, axis=1),),
           tuple(out.zeroshot))
    _scored(col, scores, hl, model, "zeroshot/macro_auc", roc)
    return {"labels": labels, "activation": "softmax over classes (sigmoid: multilabel SigLIP)"}


def retrieval(col: Collection, out: ModelOutputs, hl: Headlines, model: str,
              curves: dict[str, Any], batchwise_size: int, seed: int) -> dict[str, Any]:
    if out.text is None:
        return {"skipped": "image-only model: no text encoder for retrieval"}
    texts = np.array(col.texts(), dtype=object)
    main = main_label(col)
    positives = {"text": texts}
    if main is not None:
        positives["class"] = primary_class(col, main)
    res: dict[str, Any] = {"positives": {"text": "identical text",
                                         "class": f"same class of '{main}'"}}
    for kind, pos in positives.items():
        ri, rt = retrieval_ranks(out.image, out.text, pos)
        res[f"global_{kind}"] = {"image_to_text": summarize_ranks(ri, KS),
                                 "text_to_image": summarize_ranks(rt, KS), "n": len(ri)}
        res[f"batchwise_{kind}"] = batchwise_recall(out.image, out.text, batchwise_size,
                                                    (1, 5), pos, seed)
        if kind == "text":
            for direction, r in (("image_to_text", ri), ("text_to_image", rt)):
                for k in KS:
                    hl.add(f"retrieval/{direction}_recall@{k}", model, _recall_fn(k), (r,))
            ks = list(range(1, min(50, len(ri)) + 1))
            curves[model] = {"k": ks, **{d: [_recall_fn(k)(r) for k in ks]
                                         for d, r in (("image_to_text", ri),
                                                      ("text_to_image", rt))}}
    if main is not None and out.class_text is not None and len(col.labels[main].classes) > 1:
        res["distractor"] = {"label": main, **distractor_accuracy(
            out.image, out.class_text, positives["class"], seed=seed)}
    return res


def clustering(col: Collection, out: ModelOutputs, hl: Headlines, model: str,
               seed: int) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    names = [k for k, v in col.labels.items() if v.kind == "multiclass"]
    names = names or [k for k, v in col.labels.items() if v.kind == "multilabel"]
    res: dict[str, Any] = {"labels": {}}
    for name in names:
        y = primary_class(col, name)
        try:
            m = clustering_metrics(out.image, y, seed=seed, class_names=col.labels[name].classes)
        except DataError as exc:
            res["labels"][name] = {"skipped": exc.message}
            continue
        if col.labels[name].kind == "multilabel":
            m["note"] = "primary class (highest weight) of a multilabel label"
        res["labels"][name] = m
        keep = y >= 0  # the same k-means as clustering_metrics, kept for the bootstrap
        x = out.image[keep].astype(np.float64)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        clusters = np.full(len(y), -1, np.int64)
        clusters[keep] = KMeans(n_clusters=m["k"], n_init=3, random_state=seed).fit_predict(x)
        hl.add(f"clustering/nmi:{name}", model, _nmi, (y, clusters), bias_correct=True)
    return res
