"""Dataset spec: one YAML file that describes a labelled image collection.

See docs/architecture.md for the full format. `DatasetSpec.load(path)` validates every key
and raises `SpecError` naming the spec file and the offending key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsig.errors import SpecError

LABEL_TYPES = ("binary", "multiclass", "multilabel")
DEFAULT_MISSING = ["MISSING", ""]

_TOP_KEYS = {"name", "table", "image_root", "columns", "missing_values", "templates",
             "metadata", "labels", "description", "splits", "allow_outside_root",
             "retention"}
_RETENTION_KEYS = {"metric", "spec", "split"}
_COLUMN_KEYS = {"image", "id", "text", "group", "split"}
_LABEL_KEYS = {"name", "type", "column", "positive", "negative", "states", "classes",
               "mapping", "exclude", "separator", "weights_column", "coarse", "missing_values"}
_COARSE_KEYS = {"name", "map", "exclude"}


@dataclass
class CoarseSpec:
    """A fine -> coarse category map that derives a second label."""

    name: str
    map: str
    exclude: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)  # loaded from `map`

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "map": self.map, "exclude": list(self.exclude)}


@dataclass
class LabelSpec:
    """One label: binary, multiclass or multilabel."""

    name: str
    type: str
    column: str
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    states: list[str] | None = None
    classes: list[str] | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    separator: str | None = None
    weights_column: str | None = None
    coarse: CoarseSpec | None = None
    missing_values: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "column": self.column}
        if self.type == "binary":
            out["positive"] = list(self.positive)
            out["negative"] = list(self.negative)
        for key in ("states", "classes", "separator", "weights_column", "missing_values"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.mapping:
            out["mapping"] = dict(self.mapping)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.coarse is not None:
            out["coarse"] = self.coarse.to_dict()
        return out


@dataclass
class DatasetSpec:
    """A collection: table + image folder + column roles + labels."""

    name: str
    table: str
    image_column: str
    image_root: str = "."
    id_column: str | None = None
    text_column: str | None = None
    group_column: str | None = None
    split_column: str | None = None
    missing_values: list[str] = field(default_factory=lambda: list(DEFAULT_MISSING))
    templates: list[str] = field(default_factory=list)
    metadata: list[str] | None = None
    labels: list[LabelSpec] = field(default_factory=list)
    description: str | None = None
    splits: str | None = None  # a CSV (id, split) written by `medsig data split`
    allow_outside_root: bool = False  # image paths may resolve outside image_root
    # what a fine-tune must not forget: {metric: <eval headline metric>, spec: other.yaml
    # (default: this one), split: <split of that spec> (default: the evaluated one)}
    retention: dict[str, str] | None = None
    path: Path | None = None  # the spec file, when loaded from disk

    # -- paths -----------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def table_path(self) -> Path:
        return (self.base_dir / self.table).resolve()

    @property
    def image_root_path(self) -> Path:
        return (self.base_dir / self.image_root).resolve()

    @property
    def splits_path(self) -> Path | None:
        return (self.base_dir / self.splits).resolve() if self.splits else None

    def label(self, name: str) -> LabelSpec:
        for lab in self.labels:
            if lab.name == name or (lab.coarse is not None and lab.coarse.name == name):
                return lab
        raise SpecError(f"no label named '{name}'", file=self.path)

    @property
    def label_names(self) -> list[str]:
        names = []
        for lab in self.labels:
            names.append(lab.name)
            if lab.coarse is not None:
                names.append(lab.coarse.name)
        return names

    # -- io ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> DatasetSpec:
        path = Path(path)
        if not path.is_file():
            raise SpecError("spec file not found", file=path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise SpecError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}",
                            file=path) from None
        return cls.from_dict(raw, path=path)

    @classmethod
    def from_dict(cls, raw: Any, path: Path | None = None) -> DatasetSpec:
        where = path if path is not None else "<spec>"
        if not isinstance(raw, dict):
            raise SpecError("the spec must be a YAML mapping", file=where)
        _check_keys(raw, _TOP_KEYS, "", where)
        for key in ("table", "columns"):
            if key not in raw:
                raise SpecError(f"missing required key '{key}'", file=where)
        cols = raw["columns"]
        if not isinstance(cols, dict):
            raise SpecError("'columns' must be a mapping", file=where)
        _check_keys(cols, _COLUMN_KEYS, "columns.", where)
        if not cols.get("image"):
            raise SpecError("missing required key 'columns.image'", file=where)
        labels_raw = raw.get("labels") or []
        if not isinstance(labels_raw, list):
            raise SpecError("'labels' must be a list", file=where)
        spec = cls(
            name=str(raw.get("name") or (path.parent.name if path else "collection")),
            table=_str(raw["table"], "table", where),
            image_root=_str(raw.get("image_root", "."), "image_root", where),
            image_column=_str(cols["image"], "columns.image", where),
            id_column=_opt_str(cols.get("id"), "columns.id", where),
            text_column=_opt_str(cols.get("text"), "columns.text", where),
            group_column=_opt_str(cols.get("group"), "columns.group", where),
            split_column=_opt_str(cols.get("split"), "columns.split", where),
            missing_values=_str_list(raw.get("missing_values", DEFAULT_MISSING),
                                     "missing_values", where),
            templates=_str_list(raw.get("templates") or [], "templates", where),
            metadata=(_str_list(raw["metadata"], "metadata", where)
                      if raw.get("metadata") is not None else None),
            description=raw.get("description"),
            splits=_opt_str(raw.get("splits"), "splits", where),
            allow_outside_root=_bool(raw.get("allow_outside_root", False),
                                     "allow_outside_root", where),
            retention=_retention(raw.get("retention"), where),
            path=path.resolve() if path is not None else None,
        )
        seen: set[str] = set()
        for i, lab in enumerate(labels_raw):
            label = _parse_label(lab, i, where, spec.base_dir)
            for name in [label.name] + ([label.coarse.name] if label.coarse else []):
                if name in seen:
                    raise SpecError(f"duplicate label name '{name}'", file=where)
                seen.add(name)
            spec.labels.append(label)
        return spec

    def to_dict(self) -> dict[str, Any]:
        cols = {"image": self.image_column}
        for key in ("id", "text", "group", "split"):
            value = getattr(self, f"{key}_column")
            if value:
                cols[key] = value
        out: dict[str, Any] = {"name": self.name, "table": self.table,
                               "image_root": self.image_root, "columns": cols,
                               "missing_values": list(self.missing_values)}
        if self.description:
            out["description"] = self.description
        if self.splits:
            out["splits"] = self.splits
        if self.allow_outside_root:
            out["allow_outside_root"] = True
        if self.templates:
            out["templates"] = list(self.templates)
        if self.metadata is not None:
            out["metadata"] = list(self.metadata)
        if self.retention:
            out["retention"] = dict(self.retention)
        out["labels"] = [lab.to_dict() for lab in self.labels]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the spec as YAML (atomically). Relative paths stay relative to `path`."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        tmp.replace(path)
        self.path = path.resolve()
        return path


# -- parsing helpers -------------------------------------------------------------------------
def _check_keys(raw: dict, allowed: set[str], prefix: str, where: Any) -> None:
    for key in raw:
        if key not in allowed:
            hint = ", ".join(sorted(allowed))
            raise SpecError(f"unknown key '{prefix}{key}' (allowed: {hint})", file=where)


def _str(value: Any, key: str, where: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value == "":
        raise SpecError(f"'{key}' must be a non-empty string", file=where)
    return str(value)


def _bool(value: Any, key: str, where: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"'{key}' must be true or false, not {value!r}", file=where)
    return value


def _opt_str(value: Any, key: str, where: Any) -> str | None:
    return None if value is None else _str(value, key, where)


def _str_list(value: Any, key: str, where: Any) -> list[str]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise SpecError(f"'{key}' must be a list", file=where)
    return ["" if v is None else str(v) for v in value]


def _retention(raw: Any, where: Any) -> dict[str, str] | None:
    """The optional ``retention`` block: a metric name, optionally another spec and split."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError("'retention' must be a mapping (metric, spec, split)", file=where)
    _check_keys(raw, _RETENTION_KEYS, "retention.", where)
    if not raw.get("metric"):
        raise SpecError("missing required key 'retention.metric' (e.g. "
                        "clustering/nmi:category)", file=where)
    return {k: _str(raw[k], f"retention.{k}", where) for k in _RETENTION_KEYS if raw.get(k)}


def _parse_label(raw: Any, i: int, where: Any, base_dir: Path) -> LabelSpec:
    key = f"labels[{i}]"
    if not isinstance(raw, dict):
        raise SpecError(f"'{key}' must be a mapping", file=where)
    _check_keys(raw, _LABEL_KEYS, f"{key}.", where)
    for req in ("name", "type", "column"):
        if not raw.get(req):
            raise SpecError(f"missing required key '{key}.{req}'", file=where)
    kind = str(raw["type"])
    if kind not in LABEL_TYPES:
        raise SpecError(f"'{key}.type' is '{kind}'; expected one of {', '.join(LABEL_TYPES)}",
                        file=where)
    label = LabelSpec(name=_str(raw["name"], f"{key}.name", where), type=kind,
                      column=_str(raw["column"], f"{key}.column", where))
    key = f"labels.{label.name}"
    if kind == "binary":
        label.positive = _str_list(raw.get("positive") or [], f"{key}.positive", where)
        label.negative = _str_list(raw.get("negative") or [], f"{key}.negative", where)
        if not label.positive or not label.negative:
            raise SpecError(f"'{key}' is binary and needs both 'positive' and 'negative'",
                            file=where)
        overlap = set(label.positive) & set(label.negative)
        if overlap:
            raise SpecError(f"'{key}': {sorted(overlap)} in both positive and negative",
                            file=where)
        if raw.get("states") is not None:
            label.states = _str_list(raw["states"], f"{key}.states", where)
            if len(label.states) != 2:
                raise SpecError(f"'{key}.states' needs two names (negative, positive)",
                                file=where)
    else:
        for bad in ("positive", "negative"):
            if bad in raw:
                raise SpecError(f"'{key}.{bad}' only applies to binary labels", file=where)
    if raw.get("classes") is not None:
        label.classes = _str_list(raw["classes"], f"{key}.classes", where)
        if len(set(label.classes)) != len(label.classes):
            raise SpecError(f"'{key}.classes' has duplicates", file=where)
    mapping = raw.get("mapping") or {}
    if not isinstance(mapping, dict):
        raise SpecError(f"'{key}.mapping' must be a mapping raw value -> class", file=where)
    label.mapping = {str(k): str(v) for k, v in mapping.items()}
    label.exclude = _str_list(raw.get("exclude") or [], f"{key}.exclude", where)
    if raw.get("missing_values") is not None:
        label.missing_values = _str_list(raw["missing_values"], f"{key}.missing_values", where)
    if raw.get("separator") is not None:
        if kind != "multilabel":
            raise SpecError(f"'{key}.separator' only applies to multilabel labels", file=where)
        label.separator = str(raw["separator"])
    if raw.get("weights_column") is not None:
        if kind != "multilabel":
            raise SpecError(f"'{key}.weights_column' only applies to multilabel labels",
                            file=where)
        label.weights_column = _str(raw["weights_column"], f"{key}.weights_column", where)
    if raw.get("coarse") is not None:
        label.coarse = _parse_coarse(raw["coarse"], key, where, base_dir, kind)
    return label


def _parse_coarse(raw: Any, key: str, where: Any, base_dir: Path, kind: str) -> CoarseSpec:
    if kind == "binary":
        raise SpecError(f"'{key}.coarse' needs a multiclass or multilabel label", file=where)
    if not isinstance(raw, dict):
        raise SpecError(f"'{key}.coarse' must be a mapping with name and map", file=where)
    _check_keys(raw, _COARSE_KEYS, f"{key}.coarse.", where)
    for req in ("name", "map"):
        if not raw.get(req):
            raise SpecError(f"missing required key '{key}.coarse.{req}'", file=where)
    coarse = CoarseSpec(name=_str(raw["name"], f"{key}.coarse.name", where),
                        map=_str(raw["map"], f"{key}.coarse.map", where),
                        exclude=_str_list(raw.get("exclude") or [], f"{key}.coarse.exclude",
                                          where))
    map_path = (base_dir / coarse.map).resolve()
    if not map_path.is_file():
        raise SpecError(f"'{key}.coarse.map': file not found: {map_path}", file=where)
    try:
        mapping = json.loads(map_path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON (line {exc.lineno}): {exc.msg}", file=map_path) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise SpecError("the coarse map must be a JSON object {fine: coarse}", file=map_path)
    coarse.mapping = {str(k): v for k, v in mapping.items()}
    return coarse
