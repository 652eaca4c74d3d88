"""Encode label columns: binary / multiclass / multilabel, MISSING -> -1, fine -> coarse.

Conventions (the contract for training and evaluation):
- binary: int8 (n,) in {1, 0, -1}
- multiclass: int64 (n,) class index or -1 (missing or excluded class)
- multilabel: float32 (n, C) of 0/1; a row with no usable value is all -1
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsig.errors import DataError
from medsig.spec import DatasetSpec, LabelSpec


@dataclass
class EncodedLabel:
    """A label encoded for a whole table."""

    name: str
    kind: str
    classes: list[str]
    targets: np.ndarray
    weights: np.ndarray | None = None
    column: str | None = None
    parent: str | None = None  # for a coarse label: the fine label it derives from

    @property
    def missing(self) -> np.ndarray:
        """Boolean mask of rows whose value is missing."""
        if self.kind == "multilabel":
            return (self.targets < 0).all(axis=1)
        return self.targets < 0

    def readable(self, i: int) -> str | None:
        """The readable value of row i (None when missing)."""
        if self.missing[i]:
            return None
        if self.kind == "multilabel":
            present = [c for c, v in zip(self.classes, self.targets[i]) if v > 0]
            return ", ".join(present) if present else "none"
        return self.classes[int(self.targets[i])]

    def onehot(self) -> np.ndarray:
        """(n, K) 0/1 indicator of every class (binary: the positive class only)."""
        if self.kind == "multilabel":
            return (self.targets > 0).astype(np.int8)
        if self.kind == "binary":
            return (self.targets == 1).astype(np.int8)[:, None]
        out = np.zeros((len(self.targets), len(self.classes)), dtype=np.int8)
        ok = self.targets >= 0
        out[np.nonzero(ok)[0], self.targets[ok]] = 1
        return out

    def subset(self, idx: np.ndarray) -> EncodedLabel:
        return EncodedLabel(self.name, self.kind, self.classes, self.targets[idx],
                            None if self.weights is None else self.weights[idx],
                            self.column, self.parent)


def encode_labels(spec: DatasetSpec, frame: pd.DataFrame) -> dict[str, EncodedLabel]:
    """Encode every label of the spec (and its coarse label) over the table."""
    out: dict[str, EncodedLabel] = {}
    for lab in spec.labels:
        missing = set(lab.missing_values if lab.missing_values is not None
                      else spec.missing_values)
        if lab.type == "binary":
            enc = _encode_binary(lab, frame, missing, spec.table_path)
        elif lab.type == "multiclass":
            enc = _encode_multiclass(lab, frame, missing, spec.table_path)
        else:
            enc = _encode_multilabel(lab, frame, missing, spec.table_path)
        out[lab.name] = enc
        if lab.coarse is not None:
            out[lab.coarse.name] = _encode_coarse(lab, enc, spec.table_path)
    return out


def _is_missing(value: object, missing: set[str]) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, dict)):
        return False
    return str(value).strip() in missing


def _encode_binary(lab: LabelSpec, frame: pd.DataFrame, missing: set[str], file: Path
                   ) -> EncodedLabel:
    pos, neg = set(lab.positive), set(lab.negative)
    out = np.full(len(frame), -1, dtype=np.int8)
    for i, raw in enumerate(frame[lab.column]):
        if _is_missing(raw, missing):
            continue
        value = lab.mapping.get(str(raw).strip(), str(raw).strip())
        if value in pos:
            out[i] = 1
        elif value in neg:
            out[i] = 0
        elif value in lab.exclude:
            continue
        else:
            raise DataError(f"value '{raw}' is in neither positive {sorted(pos)} nor negative "
                            f"{sorted(neg)} of label '{lab.name}'",
                            file=file, row=i + 1, column=lab.column)
    states = lab.states or [f"not {lab.name}", lab.name]
    return EncodedLabel(lab.name, "binary", list(states), out, column=lab.column)


def _class_list(lab: LabelSpec, observed: Iterable[str]) -> list[str]:
    """The spec's classes in their order, else the observed values sorted; never an
    excluded value."""
    excluded = set(lab.exclude)
    if lab.classes is not None:
        return [c for c in lab.classes if c not in excluded]
    return sorted({v for v in observed if v not in excluded})


def _encode_multiclass(lab: LabelSpec, frame: pd.DataFrame, missing: set[str], file: Path
                       ) -> EncodedLabel:
    values: list[str | None] = []
    for raw in frame[lab.column]:
        if _is_missing(raw, missing):
            values.append(None)
        else:
            values.append(lab.mapping.get(str(raw).strip(), str(raw).strip()))
    excluded = set(lab.exclude)
    classes = _class_list(lab, (v for v in values if v is not None))
    index = {c: k for k, c in enumerate(classes)}
    out = np.full(len(frame), -1, dtype=np.int64)
    for i, value in enumerate(values):
        if value is None or value in excluded:
            continue
        if value not in index:
            raise DataError(f"value '{value}' is not a class of label '{lab.name}' "
                            f"(classes: {', '.join(classes[:10])}"
                            f"{' ...' if len(classes) > 10 else ''})",
                            file=file, row=i + 1, column=lab.column)
        out[i] = index[value]
    return EncodedLabel(lab.name, "multiclass", classes, out, column=lab.column)


def parse_list(value: object, separator: str | None = None) -> list[str]:
    """A list cell: a real list, a JSON / Python list literal, or a separated string."""
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    if separator is not None:
        return [v.strip() for v in text.split(separator) if v.strip()]
    if text.startswith("["):
        parsed = _literal(text)
        if not isinstance(parsed, list):
            raise ValueError(f"not a list: {text[:60]}")
        return [str(v).strip() for v in parsed]
    return [text] if text else []


def parse_weights(value: object) -> dict[str, float]:
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    parsed = _literal(str(value).strip())
    if not isinstance(parsed, dict):
        raise ValueError(f"not a mapping: {str(value)[:60]}")
    return {str(k): float(v) for k, v in parsed.items()}


def _literal(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"cannot parse '{text[:60]}'") from exc


def _encode_multilabel(lab: LabelSpec, frame: pd.DataFrame, missing: set[str], file: Path
                       ) -> EncodedLabel:
    rows: list[list[str] | None] = []
    for i, raw in enumerate(frame[lab.column]):
        if _is_missing(raw, missing):
            rows.append(None)
            continue
        try:
            items = [lab.mapping.get(v, v) for v in parse_list(raw, lab.separator)]
        except ValueError as exc:
            raise DataError(str(exc), file=file, row=i + 1, column=lab.column) from None
        items = [v for v in items if v not in missing]
        rows.append(items if items else None)  # an empty list carries no label: missing
    excluded = set(lab.exclude)
    classes = _class_list(lab, (v for r in rows if r for v in r))
    index = {c: k for k, c in enumerate(classes)}
    targets = np.zeros((len(frame), len(classes)), dtype=np.float32)
    weights = (np.zeros((len(frame), len(classes)), dtype=np.float32)
               if lab.weights_column else None)
    for i, items in enumerate(rows):
        if items is None:
            targets[i] = -1
            continue
        for v in items:
            if v in excluded:
                continue
            if v not in index:
                raise DataError(f"value '{v}' is not a class of label '{lab.name}'",
                                file=file, row=i + 1, column=lab.column)
            targets[i, index[v]] = 1
        if weights is not None:
            raw_w = frame.at[i, lab.weights_column]
            if _is_missing(raw_w, missing):
                weights[i] = targets[i] / max(targets[i].sum(), 1)
                continue
            try:
                parsed = parse_weights(raw_w)
            except ValueError as exc:
                raise DataError(str(exc), file=file, row=i + 1,
                                column=lab.weights_column) from None
            for cls, w in parsed.items():
                cls = lab.mapping.get(cls, cls)
                if cls in index:
                    weights[i, index[cls]] = w
    return EncodedLabel(lab.name, "multilabel", classes, targets, weights, column=lab.column)


def _encode_coarse(lab: LabelSpec, fine: EncodedLabel, file: Path) -> EncodedLabel:
    coarse = lab.coarse
    assert coarse is not None
    unmapped = [c for c in fine.classes if c not in coarse.mapping]
    if unmapped:
        raise DataError(f"classes of label '{lab.name}' missing from the coarse map: "
                        f"{', '.join(unmapped[:5])}", file=coarse.map)
    excluded = set(coarse.exclude)
    classes = sorted({coarse.mapping[c] for c in fine.classes} - excluded)
    index = {c: k for k, c in enumerate(classes)}
    fine_to_coarse = np.array([index.get(coarse.mapping[c], -1) for c in fine.classes],
                              dtype=np.int64)
    if fine.kind == "multiclass":
        ok = fine.targets >= 0
        out = np.full(len(fine.targets), -1, dtype=np.int64)
        out[ok] = fine_to_coarse[fine.targets[ok]]
        return EncodedLabel(coarse.name, "multiclass", classes, out, column=lab.column,
                            parent=lab.name)
    n = len(fine.targets)
    targets = np.zeros((n, len(classes)), dtype=np.float32)
    weights = None if fine.weights is None else np.zeros_like(targets)
    for k, c in enumerate(fine_to_coarse):
        if c < 0:
            continue
        targets[:, c] = np.maximum(targets[:, c], fine.targets[:, k] > 0)
        if weights is not None:
            weights[:, c] += fine.weights[:, k]
    targets[fine.missing] = -1
    return EncodedLabel(coarse.name, "multilabel", classes, targets, weights,
                        column=lab.column, parent=lab.name)
