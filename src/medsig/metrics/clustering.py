"""How well embeddings cluster by label: k-means against the labels, silhouette."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.cluster import KMeans

from medsig.errors import DataError


def _labels(labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep mask, class values, int codes of kept rows); -1 / None / '' / NaN excluded."""
    lab = np.asarray(labels)
    if lab.dtype.kind in "iub":
        keep = lab >= 0
    elif lab.dtype.kind == "f":
        keep = np.isfinite(lab) & (lab >= 0)
    else:
        keep = np.array([x is not None and x == x and str(x) != "" for x in lab.tolist()], bool)
        lab = lab.astype(str)
    values, codes = np.unique(lab[keep], return_inverse=True)
    return keep, values, codes.astype(np.int64)


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of items that belong to their cluster's majority label."""
    cm = skm.cluster.contingency_matrix(labels, clusters)
    return float(cm.max(axis=0).sum() / cm.sum()) if cm.size else float("nan")


def clustering_metrics(emb: Any, labels: Any, k: int | None = None, seed: int = 0,
                       class_names: Sequence[str] | None = None, n_init: int = 3,
                       silhouette_sample: int = 5000) -> dict[str, Any]:
    """K-means (k = number of classes unless given) on L2-normalised embeddings vs labels.

    Returns NMI, AMI, ARI, homogeneity, completeness, V-measure, purity, cosine silhouette of
    the true labels (``silhouette``) and of the k-means clusters (both on a random sample of
    ``silhouette_sample`` rows when larger), and per-category purity: the share of a class
    that falls in its most common cluster. Rows with a missing label (-1) are excluded.
    """
    x = np.asarray(emb.detach().cpu() if hasattr(emb, "detach") else emb, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"embeddings must be (n, d), got shape {x.shape}")
    keep, values, y = _labels(labels)
    if keep.shape != (x.shape[0],):
        raise DataError(f"{keep.shape[0]} labels for {x.shape[0]} embeddings")
    x = x[keep]
    if not np.isfinite(x).all():
        raise DataError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    n_classes = len(values)
    k = n_classes if k is None else int(k)
    if n_classes < 2 or k < 2 or len(y) <= k:
        raise DataError(f"clustering needs >= 2 classes and more rows than clusters; got "
                        f"{n_classes} classes, k={k}, {len(y)} labelled rows")
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(y), silhouette_sample, replace=False) \
        if len(y) > silhouette_sample else np.arange(len(y))

    def silhouette(lab: np.ndarray) -> float:
        if len(np.unique(lab[sample])) < 2 or len(np.unique(lab[sample])) >= len(sample):
            return float("nan")
        return float(skm.silhouette_score(x[sample], lab[sample], metric="cosine"))

    numeric = values.dtype.kind in "iu"
    names = [class_names[int(v)] if class_names is not None and numeric else str(v)
             for v in values]
    cm = skm.cluster.contingency_matrix(y, clusters)
    per_category = {
        name: {"n": int(cm[i].sum()), "cluster": int(cm[i].argmax()),
               "purity": float(cm[i].max() / cm[i].sum())}
        for i, name in enumerate(names)
    }
    return {
        "nmi": float(skm.normalized_mutual_info_score(y, clusters)),
        "ami": float(skm.adjusted_mutual_info_score(y, clusters)),
        "ari": float(skm.adjusted_rand_score(y, clusters)),
        "homogeneity": float(skm.homogeneity_score(y, clusters)),
        "completeness": float(skm.completeness_score(y, clusters)),
        "v_measure": float(skm.v_measure_score(y, clusters)),
        "purity": purity(y, clusters),
        "silhouette": silhouette(y),
        "silhouette_clusters": silhouette(clusters),
        "per_category": per_category,
        "k": k,
        "n": int(len(y)),
        "n_missing": int((~keep).sum()),
        "silhouette_n": int(len(sample)),
    }
