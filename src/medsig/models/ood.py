"""Out-of-distribution gate: how unlike the training images an image's embedding is.

Score = mean cosine distance of an image embedding to its ``k`` nearest neighbours among a
fixed random subsample of the train split's embeddings (Sun et al. 2022, "deep nearest
neighbours"). The threshold is the ``1 - false_reject`` quantile of the val scores, so about
``false_reject`` of in-distribution images are refused; an image scoring above it is
"unlike the images this model was trained on: not assessed".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError

DEFAULT_FALSE_REJECT = 0.05
DEFAULT_K = 5
MAX_REFERENCE = 4096
NOT_ASSESSED = "unlike the images this model was trained on: not assessed"


def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"embeddings must be a (n, d) array, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class OodGate:
    """Reference embeddings (unit rows), k, and the val-chosen threshold."""

    reference: np.ndarray
    k: int = DEFAULT_K
    threshold: float = float("inf")
    false_reject: float = DEFAULT_FALSE_REJECT
    n_train: int = 0
    n_val: int = 0

    def score(self, emb: Any, chunk: int = 1024) -> np.ndarray:
        """(n,) mean cosine distance to the k nearest reference embeddings (0 .. 2)."""
        x = _unit(emb)
        if x.shape[1] != self.reference.shape[1]:
            raise ConfigError(f"embedding dimension {x.shape[1]} differs from the OOD "
                              f"reference's {self.reference.shape[1]}")
        k = min(self.k, len(self.reference))
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), chunk):
            sims = x[s:s + chunk] @ self.reference.T
            top = -np.partition(-sims, k - 1, axis=1)[:, :k]
            out[s:s + chunk] = 1.0 - top.mean(axis=1)
        return out

    def flag(self, scores: Any) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def info(self) -> dict[str, Any]:
        return {"method": f"mean cosine distance to the {self.k} nearest train embeddings",
                "threshold": round(float(self.threshold), 6),
                "false_reject_target": self.false_reject, "n_reference":
                int(len(self.reference)), "n_train": self.n_train, "n_val": self.n_val}

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"reference": self.reference.astype(np.float16)}, str(path),
                  metadata={k: str(v) for k, v in self.info().items()} |
                  {"k": str(self.k), "threshold": repr(float(self.threshold)),
                   "false_reject": repr(self.false_reject)})

    @classmethod
    def load(cls, path: Path) -> OodGate:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                ref = f.get_tensor("reference").astype(np.float32)
            return cls(_unit(ref), int(meta["k"]), float(meta["threshold"]),
                       float(meta["false_reject"]), int(meta.get("n_train", 0)),
                       int(meta.get("n_val", 0)))
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"unreadable OOD statistics: {str(exc)[:120]}", file=path) \
                from None


def fit_ood(train_emb: Any, val_emb: Any, false_reject: float = DEFAULT_FALSE_REJECT,
            k: int = DEFAULT_K, max_reference: int = MAX_REFERENCE, seed: int = 0) -> OodGate:
    """Reference = up to ``max_reference`` train embeddings; threshold on val scores."""
    if not 0.0 < float(false_reject) < 1.0:
        raise ConfigError(f"OOD false-reject rate must be in (0, 1), got {false_reject!r}")
    train = _unit(train_emb)
    val = _unit(val_emb)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError("the OOD gate needs train and val embeddings")
    rng = np.random.default_rng(seed)
    if len(train) > max_reference:
        train_ref = train[np.sort(rng.choice(len(train), max_reference, replace=False))]
    else:
        train_ref = train
    train_ref = _unit(train_ref.astype(np.float16))  # as saved, so the threshold matches
    gate = OodGate(train_ref, int(k), float("inf"), float(false_reject), len(train), len(val))
    scores = gate.score(val)
    gate.threshold = float(np.quantile(scores, 1.0 - float(false_reject), method="higher"))
    return gate
