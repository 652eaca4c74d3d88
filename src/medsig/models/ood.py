"""Out-of-distribution gate: how unlike the training images an image's embedding is.

Default score: the Mahalanobis distance (squared) of the unit image embedding to the train
split's embeddings, with the covariance shrunk towards its mean variance (Lee et al. 2018;
Ledoit-Wolf-style shrinkage, weight 0.1), which measured best in ``bench/ood.py``.
Alternative (``method="knn"``): mean cosine distance to the ``k`` nearest of up to 4096
train embeddings (Sun et al. 2022). The threshold is the ``1 - false_reject`` quantile of
the val scores, so about ``false_reject`` of in-distribution images are refused; an image
scoring above it is "unlike the images this model was trained on: not assessed".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError

DEFAULT_FALSE_REJECT = 0.05
DEFAULT_K = 5
DEFAULT_METHOD = "mahalanobis"
SHRINKAGE = 0.1
MAX_REFERENCE = 4096
NOT_ASSESSED = "unlike the images this model was trained on: not assessed"


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


@dataclass
class OodGate:
    """``method`` "mahalanobis" (``mean``, ``precision``) or "knn" (``reference`` unit rows,
    ``k``), and the val-chosen threshold."""

    method: str
    arrays: dict[str, np.ndarray]
    k: int = DEFAULT_K
    threshold: float = float("inf")
    false_reject: float = DEFAULT_FALSE_REJECT
    n_train: int = 0
    n_val: int = 0

    @property
    def dim(self) -> int:
        return int(self.arrays["mean" if self.method == "mahalanobis" else "reference"]
                   .shape[-1])

    def score(self, emb: Any, chunk: int = 1024) -> np.ndarray:
        """(n,) higher = more unlike the train split."""
        x = _unit(emb)
        if x.shape[1] != self.dim:
            raise ConfigError(f"embedding dimension {x.shape[1]} differs from the OOD "
                              f"statistics' {self.dim}")
        if self.method == "mahalanobis":
            z = x - self.arrays["mean"]
            return np.einsum("ij,jk,ik->i", z, self.arrays["precision"], z).astype(np.float32)
        ref = self.arrays["reference"]
        k = min(self.k, len(ref))
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), chunk):
            sims = x[s:s + chunk] @ ref.T
            top = -np.partition(-sims, k - 1, axis=1)[:, :k]
            out[s:s + chunk] = 1.0 - top.mean(axis=1)
        return out

    def flag(self, scores: Any) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def info(self) -> dict[str, Any]:
        method = (f"Mahalanobis distance to the train embeddings (shrinkage {SHRINKAGE})"
                  if self.method == "mahalanobis" else
                  f"mean cosine distance to the {self.k} nearest train embeddings")
        return {"method": method, "kind": self.method,
                "threshold": round(float(self.threshold), 6),
                "false_reject_target": self.false_reject, "n_reference": self.n_train,
                "n_train": self.n_train, "n_val": self.n_val}

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = {"kind": self.method, "k": str(self.k), "threshold": repr(float(self.threshold)),
                "false_reject": repr(self.false_reject), "n_train": str(self.n_train),
                "n_val": str(self.n_val)}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.arrays.items()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> OodGate:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}  # noqa: SIM118
            return cls(meta["kind"], arrays, int(meta["k"]), float(meta["threshold"]),
                       float(meta["false_reject"]), int(meta.get("n_train", 0)),
                       int(meta.get("n_val", 0)))
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"unreadable OOD statistics: {str(exc)[:120]}", file=path) \
                from None


def _statistics(train: np.ndarray, method: str, max_reference: int, seed: int
                ) -> dict[str, np.ndarray]:
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
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * (np.trace(cov) / d + 1e-12) * np.eye(d)
    return {"mean": mean.astype(np.float32),
            "precision": np.linalg.inv(cov).astype(np.float32)}


def fit_ood(train_emb: Any, val_emb: Any, false_reject: float = DEFAULT_FALSE_REJECT,
            method: str = DEFAULT_METHOD, k: int = DEFAULT_K,
            max_reference: int = MAX_REFERENCE, seed: int = 0) -> OodGate:
    """Statistics of the train embeddings; threshold = val scores' 1 - false_reject
    quantile."""
    if not 0.0 < float(false_reject) < 1.0:
        raise ConfigError(f"OOD false-reject rate must be in (0, 1), got {false_reject!r}")
    train = _unit(train_emb)
    val = _unit(val_emb)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError("the OOD gate needs train and val embeddings")
    gate = OodGate(method, _statistics(train, method, max_reference, seed), int(k),
                   float("inf"), float(false_reject), len(train), len(val))
    scores = gate.score(val)
    gate.threshold = float(np.quantile(scores, 1.0 - float(false_reject), method="higher"))
    return gate
