"""Oversampling of rare classes, for the train split only."""

from __future__ import annotations

import numpy as np

from medsig.data.collection import Collection
from medsig.errors import ConfigError


def oversample_indices(
    collection: Collection,
    label: str,
    min_count: int = 30,
    seed: int = 0,
    split: str | None = "train",
) -> np.ndarray:
    """Row indices where every class of `label` with fewer than `min_count` rows is repeated
    (sampling its rows with replacement) up to `min_count`. Rows outside `split` are never
    repeated, and are not returned when a split is given: val / test stay untouched.
    """
    if label not in collection.labels:
        raise ConfigError(f"oversampling: no label named '{label}' "
                          f"(labels: {', '.join(collection.labels)})")
    rows = np.arange(len(collection))
    if split is not None:
        if collection.split is None:
            raise ConfigError("oversampling needs a split; run `medsig data split` first")
        rows = rows[collection.split == split]
    onehot = collection.labels[label].onehot()[rows]
    rng = np.random.default_rng(seed)
    extra = []
    for j in range(onehot.shape[1]):
        members = rows[onehot[:, j] > 0]
        if 0 < len(members) < min_count:
            extra.append(rng.choice(members, size=min_count - len(members), replace=True))
    out = np.concatenate([rows, *extra]) if extra else rows
    return np.sort(out, kind="stable")


def class_counts(collection: Collection, label: str, idx: np.ndarray | None = None
                 ) -> dict[str, int]:
    lab = collection.labels[label]
    onehot = lab.onehot() if idx is None else lab.onehot()[idx]
    names = [lab.classes[1]] if lab.kind == "binary" else lab.classes
    return {c: int(onehot[:, j].sum()) for j, c in enumerate(names)}
