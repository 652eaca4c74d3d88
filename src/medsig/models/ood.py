"""Out-of-distribution gate: how unlike the training images an image is.

Channel 1, ``embedding``: the Mahalanobis distance (squared) of the unit image embedding to
the train split's embeddings, with the covariance shrunk towards its mean variance (Lee et
al. 2018; Ledoit-Wolf-style shrinkage, weight 0.1), which measured best in ``bench/ood.py``.
Alternative (``method="knn"``): mean cosine distance to the ``k`` nearest of up to 4096
train embeddings (Sun et al. 2022).

Channel 2, ``image_stats`` (model-free, optional): the image's statistics
(``medsig.data.image_stats``: colour, layout, texture, the region unlike the background),
standardised per feature on the train split and whitened with their shrunk covariance. The
train images are several populations (kinds, sites, skin tones), so the default
(``stats_method="knn"``) is a relative nearest-neighbour distance there: the mean distance
to the ``STATS_K`` nearest train rows over those neighbours' own mean distance to theirs
(LOF-like), squared; ``"mahalanobis"`` is one Gaussian (the distance to the mean; folders
written before the option). An encoder that has not learnt what separates, say, a
skin-lesion photo from a wound photo still sees colours, edges and shapes differ here.

With both channels each channel's score becomes a p-value against the val split (the
survival function of a gamma distribution fitted to the val scores by moments: a squared
Mahalanobis distance is close to a scaled chi-square; on ``bench/ood.py``'s test split it
kept the nominal rate better than a log-normal fit) and the p-values are combined
(``COMBINE``: the Bonferroni-corrected minimum, robust to one uninformative channel, or
Fisher's method); the gate's score is ``-log10`` of the combined p-value. Either way the
threshold is the ``1 - false_reject`` quantile of the val scores, so about ``false_reject``
of in-distribution images are refused; an image scoring above it is "unlike the images this
model was trained on: not assessed". A gate saved without the second channel (older
folders) scores with the embedding channel alone, as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError

DEFAULT_FALSE_REJECT = 0.05
DEFAULT_K = 5
DEFAULT_METHOD = "mahalanobis"
SHRINKAGE = 0.1
STATS_SHRINKAGE = 0.02
STATS_METHODS = ("knn", "mahalanobis")
DEFAULT_STATS_METHOD = "knn"
STATS_K = 10
MAX_REFERENCE = 4096
COMBINE = ("bonferroni", "fisher")
DEFAULT_COMBINE = "bonferroni"
NOT_ASSESSED = "unlike the images this model was trained on: not assessed"
EMBEDDING, IMAGE_STATS = "embedding", "image_stats"
_STATS = "stats."  # key prefix of the second channel's arrays


def is_blank(image: Any, tolerance: float = 4.0) -> bool:
    """A (near-)uniform PIL image: every channel's standard deviation below ``tolerance``
    grey levels - nothing to assess, whatever the embedding says."""
    from PIL import ImageStat

    return max(ImageStat.Stat(image.convert("RGB")).stddev) < tolerance


def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"embeddings must be a (n, d) array, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    z = x - mean
    return np.einsum("ij,jk,ik->i", z, precision, z).astype(np.float32)


def channel_p(scores: Any, shape: float, scale: float) -> np.ndarray:
    """log p-values of raw channel scores against the val fit (a gamma distribution's
    ``shape`` and ``scale``): ``log P(S >= s)``, finite for any score."""
    from scipy.stats import gamma

    return gamma.logsf(np.asarray(scores, np.float64), shape, scale=scale)


def combine_p(log_ps: list[np.ndarray], rule: str = DEFAULT_COMBINE) -> np.ndarray:
    """Combined log p-value of independent-looking channel tests: Fisher's method
    (``-2 sum log p ~ chi2(2m)``) or the Bonferroni-corrected minimum."""
    stacked = np.stack(log_ps)
    if rule == "fisher":
        from scipy.stats import chi2

        return chi2.logsf(-2.0 * stacked.sum(axis=0), 2 * len(log_ps))
    if rule == "bonferroni":
        return np.minimum(0.0, stacked.min(axis=0) + math.log(len(log_ps)))
    raise ConfigError(f"unknown OOD combination rule {rule!r} ({' or '.join(COMBINE)})")


@dataclass
class OodGate:
    """``method`` "mahalanobis" (``mean``, ``precision``) or "knn" (``reference`` unit rows,
    ``k``) on embeddings; optionally the image-statistics channel (``stats.center``,
    ``stats.scale``, ``stats.mean``, ``stats.precision``) with each channel's val fit
    (``calibration``: name -> gamma [shape, scale]) and the combination rule;
    and the val-chosen threshold."""

    method: str
    arrays: dict[str, np.ndarray]
    k: int = DEFAULT_K
    threshold: float = float("inf")
    false_reject: float = DEFAULT_FALSE_REJECT
    n_train: int = 0
    n_val: int = 0
    calibration: dict[str, list[float]] = field(default_factory=dict)
    combine: str = DEFAULT_COMBINE
    stats_method: str = "mahalanobis"

    @property
    def dim(self) -> int:
        return int(self.arrays["mean" if self.method == "mahalanobis" else "reference"]
                   .shape[-1])

    @property
    def channels(self) -> list[str]:
        return [EMBEDDING, IMAGE_STATS] if _STATS + "mean" in self.arrays else [EMBEDDING]

    @property
    def needs_stats(self) -> bool:
        """Whether scoring needs the images' statistics (``medsig.data.image_stats``)."""
        return IMAGE_STATS in self.channels

    def embedding_score(self, emb: Any, chunk: int = 1024) -> np.ndarray:
        """(n,) the embedding channel's raw score; higher = more unlike the train split."""
        x = _unit(emb)
        if x.shape[1] != self.dim:
            raise ConfigError(f"embedding dimension {x.shape[1]} differs from the OOD "
                              f"statistics' {self.dim}")
        if self.method == "mahalanobis":
            return _mahalanobis(x, self.arrays["mean"], self.arrays["precision"])
        ref = self.arrays["reference"]
        k = min(self.k, len(ref))
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), chunk):
            sims = x[s:s + chunk] @ ref.T
            top = -np.partition(-sims, k - 1, axis=1)[:, :k]
            out[s:s + chunk] = 1.0 - top.mean(axis=1)
        return out

    def stats_score(self, stats: Any) -> np.ndarray:
        """(n,) the image-statistics channel's raw score: relative kNN distance (``knn``) or
        shrunk Mahalanobis distance (``mahalanobis``) of the standardised statistics."""
        a = self.arrays
        x = np.asarray(stats, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != a[_STATS + "mean"].shape[-1]:
            raise ConfigError(f"image statistics of shape {x.shape} do not match the OOD "
                              f"gate's {a[_STATS + 'mean'].shape[-1]} statistics")
        z = (x - a[_STATS + "center"]) / a[_STATS + "scale"]
        if self.stats_method == "mahalanobis":
            return _mahalanobis(z, a[_STATS + "mean"], a[_STATS + "precision"])
        ref, radius = a[_STATS + "reference"], a[_STATS + "radius"]
        dist, idx = _nearest((z - a[_STATS + "mean"]) @ a[_STATS + "whiten"], ref, self.k_stats)
        return ((dist.mean(axis=1) / radius[idx].mean(axis=1)) ** 2).astype(np.float32)

    @property
    def k_stats(self) -> int:
        """Neighbours of the kNN image-statistics channel (fewer for a tiny train split)."""
        return max(1, min(STATS_K, len(self.arrays.get(_STATS + "reference", ())) - 1))

    def channel_scores(self, emb: Any, stats: Any = None) -> dict[str, np.ndarray]:
        """Raw score per channel (name -> (n,))."""
        out = {EMBEDDING: self.embedding_score(emb)}
        if self.needs_stats:
            if stats is None:
                raise ConfigError("this OOD gate also scores image statistics: pass them "
                                  "(medsig.data.image_stats.pixel_stats)")
            if len(stats) != len(out[EMBEDDING]):
                raise ConfigError(f"{len(stats)} rows of image statistics for "
                                  f"{len(out[EMBEDDING])} embeddings")
            out[IMAGE_STATS] = self.stats_score(stats)
        return out

    def log_p(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each channel's log p-value against its val fit."""
        return {c: channel_p(v, *self.calibration[c]) for c, v in raw.items()}

    def combined(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The gate's score from raw channel scores: one channel -> its raw score; two ->
        ``-log10`` of the combined p-value."""
        if len(raw) == 1:
            return next(iter(raw.values()))
        return (-combine_p(list(self.log_p(raw).values()), self.combine)
                / math.log(10)).astype(np.float32)

    def score(self, emb: Any, stats: Any = None) -> np.ndarray:
        """(n,) higher = more unlike the train split (compare with ``threshold``)."""
        return self.combined(self.channel_scores(emb, stats))

    def flag(self, scores: Any) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def info(self) -> dict[str, Any]:
        method = (f"Mahalanobis distance to the train embeddings (shrinkage {SHRINKAGE})"
                  if self.method == "mahalanobis" else
                  f"mean cosine distance to the {self.k} nearest train embeddings")
        if self.needs_stats:
            stats = (f"relative distance to the {self.k_stats} nearest train image "
                     "statistics (whitened" if self.stats_method == "knn" else
                     "Mahalanobis distance of the image statistics (")
            method = (f"-log10 p ({self.combine}) of two channels: {method}; {stats}, "
                      f"shrinkage {STATS_SHRINKAGE})")
        return {"method": method, "kind": self.method, "channels": self.channels,
                "combine": self.combine if self.needs_stats else None,
                "stats_method": self.stats_method if self.needs_stats else None,
                "threshold": round(float(self.threshold), 6),
                "false_reject_target": self.false_reject, "n_reference": self.n_train,
                "n_train": self.n_train, "n_val": self.n_val}

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = {"kind": self.method, "k": str(self.k), "threshold": repr(float(self.threshold)),
                "false_reject": repr(self.false_reject), "n_train": str(self.n_train),
                "n_val": str(self.n_val), "channels": ",".join(self.channels),
                "calibration": json.dumps(self.calibration), "combine": self.combine,
                "stats_method": self.stats_method}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.arrays.items()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> OodGate:
        """A saved gate; files written before the second channel load as one-channel gates."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}  # noqa: SIM118
            gate = cls(meta["kind"], arrays, int(meta["k"]), float(meta["threshold"]),
                       float(meta["false_reject"]), int(meta.get("n_train", 0)),
                       int(meta.get("n_val", 0)),
                       {str(c): [float(m), float(s)] for c, (m, s) in
                        json.loads(meta.get("calibration") or "{}").items()},
                       str(meta.get("combine") or DEFAULT_COMBINE),
                       str(meta.get("stats_method") or "mahalanobis"))
            if gate.needs_stats and set(gate.calibration) != set(gate.channels):
                raise ValueError("channel calibration missing")
            if gate.needs_stats and gate.stats_method == "knn" and not {
                    _STATS + "reference", _STATS + "radius", _STATS + "whiten"} <= set(arrays):
                raise ValueError("kNN image statistics missing")
            return gate
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"unreadable OOD statistics: {str(exc)[:120]}", file=path) \
                from None


def pixel_scores(gate: OodGate, predictor: Any, pixels: Any, emb: Any = None
                 ) -> dict[str, np.ndarray]:
    """Raw channel scores of a batch of preprocessed pixels: the predictor's embeddings
    (``emb`` when already computed) and, when the gate has that channel, the pixels'
    statistics (``medsig.data.image_stats.pixel_stats``)."""
    stats = None
    if gate.needs_stats:
        from medsig.data.image_stats import pixel_stats

        stats = pixel_stats(pixels, predictor.preprocess)
    return gate.channel_scores(predictor.embed(pixels) if emb is None else emb, stats)


def _statistics(train: np.ndarray, method: str, max_reference: int, seed: int,
                shrinkage: float = SHRINKAGE) -> dict[str, np.ndarray]:
    if method == "knn":
        if len(train) > max_reference:
            rng = np.random.default_rng(seed)
            train = train[np.sort(rng.choice(len(train), max_reference, replace=False))]
        return {"reference": train}
    if method != "mahalanobis":
        raise ConfigError(f"unknown OOD method {method!r} (mahalanobis or knn)")
    mean = train.mean(axis=0)
    z = (train - mean).astype(np.float64)
    cov = z.T @ z / max(1, len(z) - 1)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d + 1e-12) * np.eye(d)
    return {"mean": mean.astype(np.float32),
            "precision": np.linalg.inv(cov).astype(np.float32)}


def _nearest(q: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool = False,
             chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (n, k) to the ``k`` nearest ``ref`` rows and their indices
    (``exclude_self``: ``q`` is ``ref`` and a row is not its own neighbour)."""
    q, ref = q.astype(np.float32), ref.astype(np.float32)
    dist = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    rn = (ref * ref).sum(axis=1)
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk]
        d2 = (block * block).sum(axis=1)[:, None] + rn[None] - 2.0 * block @ ref.T
        if exclude_self:
            d2[np.arange(len(block)), np.arange(s, s + len(block))] = np.inf
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(top, axis=1)
        idx[s:s + chunk] = np.take_along_axis(part, order, axis=1)
        dist[s:s + chunk] = np.sqrt(np.maximum(np.take_along_axis(top, order, axis=1), 0))
    return dist, idx


def _stats_channel(train_stats: Any, n_train: int, method: str) -> dict[str, np.ndarray]:
    """Standardisation (train mean, std) and shrunk Mahalanobis statistics of the image
    statistics, under the ``stats.`` prefix; for ``knn`` also the whitening matrix, the
    whitened train rows and each row's mean distance to its ``STATS_K`` neighbours."""
    x = np.asarray(train_stats, dtype=np.float64)
    if x.ndim != 2 or len(x) != n_train:
        raise ConfigError(f"image statistics must be one (n, d) row per train embedding, got "
                          f"shape {x.shape} for {n_train} embeddings")
    if method not in STATS_METHODS:
        raise ConfigError(f"unknown image-statistics method {method!r} "
                          f"({' or '.join(STATS_METHODS)})")
    center, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - center) / scale
    fit = _statistics(z, "mahalanobis", 0, 0, STATS_SHRINKAGE)
    out = {_STATS + "center": center.astype(np.float32),
           _STATS + "scale": scale.astype(np.float32),
           **{_STATS + k: v for k, v in fit.items()}}
    if method == "knn":
        if len(z) < 2:
            raise ConfigError("the kNN image-statistics channel needs >= 2 train images")
        w, v = np.linalg.eigh(fit["precision"].astype(np.float64))
        whiten = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T  # precision ** 0.5
        ref = ((z - fit["mean"]) @ whiten).astype(np.float32)
        dist, _ = _nearest(ref, ref, min(STATS_K, len(ref) - 1), exclude_self=True)
        out.update({_STATS + "whiten": whiten.astype(np.float32),
                    _STATS + "reference": ref,
                    _STATS + "radius": np.maximum(dist.mean(axis=1), 1e-6)})
    return out


def _val_fit(scores: np.ndarray) -> list[float]:
    """[shape, scale] of a gamma distribution with the val scores' mean and variance (a
    channel's reference distribution)."""
    x = scores.astype(np.float64)
    mean = max(float(x.mean()), 1e-12)
    var = max(float(x.var(ddof=1)) if len(x) > 1 else 0.0, 1e-12 * mean * mean)
    return [mean * mean / var, var / mean]


def fit_ood(train_emb: Any, val_emb: Any, false_reject: float = DEFAULT_FALSE_REJECT,
            method: str = DEFAULT_METHOD, k: int = DEFAULT_K,
            max_reference: int = MAX_REFERENCE, seed: int = 0, train_stats: Any = None,
            val_stats: Any = None, combine: str = DEFAULT_COMBINE,
            stats_method: str = DEFAULT_STATS_METHOD) -> OodGate:
    """Statistics of the train embeddings (and, given ``train_stats`` / ``val_stats``, of
    the train images' statistics); threshold = val scores' 1 - false_reject quantile."""
    if not 0.0 < float(false_reject) < 1.0:
        raise ConfigError(f"OOD false-reject rate must be in (0, 1), got {false_reject!r}")
    if combine not in COMBINE:
        raise ConfigError(f"unknown OOD combination rule {combine!r} ({' or '.join(COMBINE)})")
    train = _unit(train_emb)
    val = _unit(val_emb)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError("the OOD gate needs train and val embeddings")
    if (train_stats is None) != (val_stats is None):
        raise ConfigError("the OOD gate's image statistics need both train and val rows")
    arrays = _statistics(train, method, max_reference, seed)
    if train_stats is not None:
        arrays.update(_stats_channel(train_stats, len(train), stats_method))
    gate = OodGate(method, arrays, int(k), float("inf"), float(false_reject), len(train),
                   len(val), combine=combine, stats_method=stats_method)
    raw = gate.channel_scores(val, val_stats)
    if gate.needs_stats:
        gate.calibration = {c: _val_fit(v) for c, v in raw.items()}
    scores = gate.combined(raw)
    gate.threshold = float(np.quantile(scores, 1.0 - float(false_reject), method="higher"))
    return gate
