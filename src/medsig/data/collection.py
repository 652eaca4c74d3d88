"""Collection: a spec, its table, encoded labels, texts, image paths, groups and split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medsig.data.images import RootedPath
from medsig.data.labels import EncodedLabel, encode_labels
from medsig.data.table import read_table, require_columns
from medsig.data.text import render_text
from medsig.errors import DataError
from medsig.spec import DatasetSpec

SPLITS = ("train", "val", "test")
_SPLIT_ORDER = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def split_key(name: str) -> tuple[int, str]:
    """Sort key putting splits in data-flow order: train < val < test < anything else."""
    return (_SPLIT_ORDER.get(name, 3), name)
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}


@dataclass
class Collection:
    """Everything medsig knows about a collection, aligned row by row with `frame`."""

    spec: DatasetSpec
    frame: pd.DataFrame
    ids: list[str]
    image_paths: list[Path]
    groups: np.ndarray
    labels: dict[str, EncodedLabel]
    split: np.ndarray | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def metadata_columns(self) -> list[str]:
        if self.spec.metadata is not None:
            return list(self.spec.metadata)
        return [c for c in self.frame.columns if not isinstance(self.frame[c].iloc[0], list)]

    def lookup(self, i: int, name: str) -> str | None:
        """A label's readable value or a raw column value for row i (None if missing)."""
        if name in self.labels:
            return self.labels[name].readable(i)
        if name in self.frame.columns:
            value = self.frame.at[i, name]
            if isinstance(value, list):
                return ", ".join(map(str, value)) or None
            value = str(value).strip()
            return None if value in self.spec.missing_values else value
        return None

    def text(self, i: int, rng: random.Random | None = None) -> str:
        raw = self.lookup(i, self.spec.text_column) if self.spec.text_column else None
        return render_text(raw, self.spec.templates, lambda name: self.lookup(i, name), rng,
                           fallback=f"A medical image from {self.spec.name}.")

    def texts(self, rng: random.Random | None = None) -> list[str]:
        return [self.text(i, rng) for i in range(len(self))]

    def label_matrix(self) -> np.ndarray:
        """(n, K) 0/1 indicator of every class of every label (for stratification)."""
        parts = [lab.onehot() for lab in self.labels.values()]
        if not parts:
            return np.zeros((len(self), 0), dtype=np.int8)
        return np.concatenate(parts, axis=1)

    def subset(self, idx: np.ndarray | list[int]) -> Collection:
        """Rows `idx` as a new collection (frame re-indexed; `rows` keeps original numbers)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Collection(
            spec=self.spec,
            frame=self.frame.iloc[idx].reset_index(drop=True),
            ids=[self.ids[i] for i in idx],
            image_paths=[self.image_paths[i] for i in idx],
            groups=self.groups[idx],
            labels={k: v.subset(idx) for k, v in self.labels.items()},
            split=None if self.split is None else self.split[idx],
            rows=self.rows[idx],
        )

    def select_split(self, name: str) -> Collection:
        if self.split is None:
            raise DataError("the collection has no split; run `medsig data split` first",
                            file=self.spec.path)
        return self.subset(np.nonzero(self.split == name)[0])

    def with_split(self, split: np.ndarray) -> Collection:
        out = self.subset(np.arange(len(self)))
        out.split = np.asarray(split, dtype=object)
        return out


def load_collection(spec: DatasetSpec | str | Path) -> Collection:
    """Read the table of a spec and encode everything. Raises DataError on bad values."""
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec.load(spec)
    file = spec.table_path
    frame = read_table(file)
    roles = {"columns.image": spec.image_column, "columns.id": spec.id_column,
             "columns.text": spec.text_column, "columns.group": spec.group_column,
             "columns.split": spec.split_column}
    roles.update({f"labels.{lab.name}.column": lab.column for lab in spec.labels})
    roles.update({f"labels.{lab.name}.weights_column": lab.weights_column
                  for lab in spec.labels})
    require_columns(frame, roles, file)
    for c in spec.metadata or []:
        require_columns(frame, {"metadata": c}, file)

    images = [str(v).strip() for v in frame[spec.image_column]]
    for i, v in enumerate(images):
        if not v or v in spec.missing_values:
            raise DataError("empty image path", file=file, row=i + 1, column=spec.image_column)
        if "\x00" in v:
            raise DataError("image path contains a NUL byte", file=file, row=i + 1,
                            column=spec.image_column)
    root = spec.image_root_path
    image_paths = ([root / v for v in images] if spec.allow_outside_root
                   else [RootedPath.under(root, root / v) for v in images])
    id_col = spec.id_column or spec.image_column
    ids = [str(v).strip() for v in frame[id_col]]
    for i, v in enumerate(ids):
        if not v:
            raise DataError("empty id", file=file, row=i + 1, column=id_col)
    _check_unique(ids, file, id_col)
    groups = (np.array([str(v).strip() for v in frame[spec.group_column]], dtype=object)
              if spec.group_column else np.array(ids, dtype=object))
    for i, g in enumerate(groups):
        if g in ("", *spec.missing_values):
            raise DataError("empty group (case / patient) id", file=file, row=i + 1,
                            column=spec.group_column)
    labels = encode_labels(spec, frame)
    split = None
    if spec.split_column:
        split = _normalise_split(list(frame[spec.split_column]), file, spec.split_column)
    elif spec.splits_path is not None:
        split = _read_split_file(spec.splits_path, ids)
    return Collection(spec, frame, ids, image_paths, groups, labels, split,
                      rows=np.arange(len(frame), dtype=np.int64))


def _check_unique(ids: list[str], file: Path, column: str) -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise DataError(f"duplicate id '{v}' (also row {seen[v] + 1})", file=file,
                            row=i + 1, column=column)
        seen[v] = i


def _normalise_split(values: list[object], file: Path, column: str) -> np.ndarray:
    out = []
    for i, v in enumerate(values):
        name = _SPLIT_ALIASES.get(str(v).strip().lower())
        if name is None:
            raise DataError(f"split value '{v}' is not one of train / val / test",
                            file=file, row=i + 1, column=column)
        out.append(name)
    return np.array(out, dtype=object)


def _read_split_file(path: Path, ids: list[str]) -> np.ndarray:
    table = read_table(path)
    require_columns(table, {"splits": "id"}, path)
    require_columns(table, {"splits": "split"}, path)
    mapping = dict(zip(table["id"].astype(str), table["split"]))
    values = []
    for i, v in enumerate(ids):
        if v not in mapping:
            raise DataError(f"id '{v}' of the table has no split; re-run `medsig data split`",
                            file=path, row=i + 1)
        values.append(mapping[v])
    return _normalise_split(values, path, "split")
