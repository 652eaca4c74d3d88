"""Training configuration: nested dataclasses loaded from YAML, with `key=value` overrides.

Keys may be dotted (`optim.lr=1e-4`, `adapt.lora.r=4`) or flat (`lr=1e-4`) when the name
is unique; an unknown key raises ConfigError naming it (with a suggestion).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medsig.errors import ConfigError
from medsig.train.defaults import apply_init_defaults

OBJECTIVES = ("contrastive", "classify", "probe")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEXT_SOURCES = ("description", "templates")
POSITIVES = ("same_class", "any_shared", "identical_text", "coarse")
LOSSES = ("sigmoid", "multi_positive_sigmoid", "softmax")
METHODS = ("full", "lora", "partial")
INITS = ("auto", "random", "pretrained")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    merge: bool = True  # merge the adapter into the weights on save (else a peft adapter)


@dataclass
class AdaptConfig:
    method: str = "full"  # full | lora | partial
    lora: LoraSettings = field(default_factory=LoraSettings)
    unfreeze_last_n_layers: int | None = None  # partial: last N layers of each tower
    unfreeze_fraction: float | None = None  # partial: last X (0..1] of each tower's layers
    lock_text: bool = False
    lock_image: bool = False


@dataclass
class OptimConfig:
    epochs: int | None = None  # default by `init`: 20 (random) / 5 (pretrained)
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    gradcache: bool = False  # contrastive: one loss over the whole accumulated batch
    lr: float | None = None  # default by `init`: 1e-3 (random) / 1e-5 (pretrained)
    weight_decay: float = 0.05
    warmup_ratio: float | None = None  # default by `init`: 0.05 (random) / 0.1 (pretrained)
    warmup_steps: int | None = None  # when set, wins over warmup_ratio
    grad_clip: float | None = 1.0

    def warmup_for(self, total: int) -> int:
        """Warm-up steps of a run of `total` optimizer steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return math.ceil((self.warmup_ratio or 0.0) * total)


@dataclass
class DataConfig:
    text: str = "description"  # description | templates (a random template each epoch)
    augment: bool = True
    oversample: dict[str, Any] | None = None  # {label: name, min_count: 30}
    class_balanced: bool = False
    balance_label: str | None = None  # default: the first training label


@dataclass
class ContrastiveConfig:
    loss: str = "sigmoid"  # sigmoid | multi_positive_sigmoid | softmax
    positives: str = "identical_text"  # same_class | any_shared | identical_text | coarse
    main_label: str | None = None  # label for positives / NMI; default: first label
    chunk_size: int | None = None  # loss computed in row blocks of this size
    supcon_weight: float = 0.0
    supcon_temperature: float = 0.1
    hard_negatives: bool = False
    hard_negatives_k: int = 3


@dataclass
class ProbeConfig:
    kind: str = "logistic"  # logistic | mlp
    C: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # chosen on val
    hidden: list[int] = field(default_factory=lambda: [256])  # mlp hidden widths (or one int)
    mlp_dropout: float = 0.2
    l2: float = 1e-3  # mlp weight decay
    mlp_epochs: int = 300  # full batch; the epoch with the best val loss is kept
    mlp_lr: float = 1e-3


@dataclass
class EvalConfig:
    eval_every: int = 1  # epochs
    save_every_steps: int | None = None
    best_metric: str | None = None  # default: val/recall@1 (contrastive), val/macro_auc
    best_mode: str | None = None  # max | min; default: min for losses, else max
    patience: int | None = None  # early stopping: evaluations without improvement
    thresholds: Any = "youden"  # "youden" or {label: minimum sensitivity}
    at_start: bool = True  # evaluate before the first step
    safe_outputs: bool = True  # fit temperatures, conformal sets and the OOD gate (val)
    alpha: Any = 0.1  # conformal error rate: one value or {label: alpha}
    ood_false_reject: float = 0.05  # share of in-distribution val images the gate refuses


@dataclass
class TrainConfig:
    spec: str = ""
    model: str = ""
    out: str = ""
    objective: str = "contrastive"
    init: str = "auto"  # auto | random | pretrained: picks the lr / epochs / warm-up defaults
    labels: list[str] | None = None  # labels to train on; default: every label
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    num_workers: int | None = None  # loader processes; None: 0 on <= 2 cores, else cores-1 (<= 4)
    threads: int | None = None  # torch threads on CPU; None: the cores the loaders leave
    prefetch: int = 2  # with num_workers 0: batches a background thread reads ahead (0: off)
    # None: what the starting model recorded, else reference | pad | resize | processor
    preprocess: str | None = None
    # SigLIP 2 NaFlex: most patches per image (None: what the model recorded / its processor)
    max_num_patches: int | None = None
    blend: list[float] = field(default_factory=list)  # WiSE-FT alphas written to out/blend/
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    source: str | None = field(default=None, metadata={"internal": True})
    init_note: str = field(default="", metadata={"internal": True})  # printed by the loop

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        out.pop("init_note", None)
        return out

    @property
    def metric(self) -> str:
        if self.eval.best_metric:
            return self.eval.best_metric
        return "val/recall@1" if self.objective == "contrastive" else "val/macro_auc"

    @property
    def mode(self) -> str:
        if self.eval.best_mode:
            return self.eval.best_mode
        return "min" if self.metric.endswith("loss") else "max"


# ----------------------------------------------------------------------------- loading
def load_config(source: TrainConfig | dict | str | Path,
                overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A validated TrainConfig from a config object, a dict or a YAML file, plus overrides."""
    where: str | None = None
    if isinstance(source, TrainConfig):
        raw = source.to_dict()
        where = source.source
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("config file not found", file=path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {str(exc).splitlines()[0]}", file=path) from None
        if not isinstance(raw, dict):
            raise ConfigError("a training config must be a mapping", file=path)
        where = str(path)
        raw = _relative_paths(raw, path.parent)
    cfg = TrainConfig()
    for key, value in _flatten(raw).items():
        set_key(cfg, key, value, where)
    for key, value in _parse_overrides(overrides).items():
        set_key(cfg, key, value, "--set")
    cfg.source = where
    _choice(cfg.init, INITS, "init", where)
    cfg.init_note = (source.init_note if isinstance(source, TrainConfig) and source.init_note
                     else apply_init_defaults(cfg.optim, cfg.init, cfg.model))
    validate(cfg, where)
    return cfg


def _relative_paths(raw: dict, base: Path) -> dict:
    raw = dict(raw)
    for key in ("spec", "out"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str((base / raw[key]).resolve())
    model = raw.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (base / model).exists():
        raw["model"] = str((base / model).resolve())
    return raw


def _flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; dict-valued fields stay whole."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(name):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_section(dotted: str) -> bool:
    try:
        path = _full_path(dotted)
    except ConfigError:
        return False
    obj: Any = TrainConfig()
    for part in path:
        obj = getattr(obj, part, None)
    return dataclasses.is_dataclass(obj)


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return _flatten(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    obj = TrainConfig() if obj is None else obj
    keys = []
    for f in fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _full_path(key: str) -> list[str]:
    """A dotted or flat key -> its full dotted path (ConfigError if unknown / ambiguous)."""
    keys = _all_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    sections |= {s.rsplit(".", 1)[0] for s in sections if "." in s}
    if key in keys or key in sections:
        return key.split(".")
    matches = [k for k in [*keys, *sections] if k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0].split(".")
    if len(matches) > 1:
        raise ConfigError(f"key '{key}' is ambiguous: {', '.join(sorted(matches))}")
    close = difflib.get_close_matches(key, keys + [k.rsplit(".", 1)[-1] for k in keys], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}")


def _resolve(cfg: TrainConfig, key: str, where: str | None
             ) -> tuple[Any, dataclasses.Field | None, list[str]]:
    try:
        path = _full_path(key)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=where) from None
    obj: Any = cfg
    for part in path[:-1]:
        obj = getattr(obj, part)
    f = next((f for f in fields(obj) if f.name == path[-1]), None)
    return obj, f, path


def set_key(cfg: TrainConfig, key: str, value: Any, where: str | None = None) -> None:
    """Set one (dotted or flat) key, converting the value to the field's type.

    A key below a mapping-valued field sets one entry: ``eval.thresholds.urgency=0.9``.
    """
    try:
        obj, f, path = _resolve(cfg, key, where)
    except ConfigError:
        if "." not in key or not _set_entry(cfg, key, value, where):
            raise
        return
    assert f is not None
    kind = _hints(type(obj))[f.name]
    name = ".".join(path)
    if dataclasses.is_dataclass(kind):
        if value is None:
            setattr(obj, f.name, kind())
            return
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a mapping, got {value!r}", file=where)
        for k, v in _flatten(value).items():
            set_key(cfg, f"{name}.{k}", v, where)
        return
    setattr(obj, f.name, _convert(value, kind, name, where))


def _set_entry(cfg: TrainConfig, key: str, value: Any, where: str | None) -> bool:
    """Set ``parent.entry`` when ``parent`` is a free-form (mapping) field; False otherwise."""
    parent, entry = key.rsplit(".", 1)
    try:
        obj, f, _ = _resolve(cfg, parent, where)
    except ConfigError:
        return False
    if f is None or _hints(type(obj))[f.name] is not Any:
        return False
    current = getattr(obj, f.name)
    mapping = dict(current) if isinstance(current, dict) else {}
    mapping[entry] = value
    setattr(obj, f.name, mapping)
    return True


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, kind: Any, name: str, where: str | None) -> Any:
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], name, where)
    if kind is Any:
        return value
    bad = ConfigError(f"'{name}' must be {_describe(kind)}, got {value!r}", file=where)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if kind is int:
            if number != int(number):
                raise bad
            return int(number)
        return number
    if kind is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_convert(v, args[0], name, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(kind, str(kind))


# ----------------------------------------------------------------------------- validation
def _choice(value: Any, allowed: tuple[str, ...], name: str, where: str | None) -> None:
    if value not in allowed:
        raise ConfigError(f"'{name}' must be one of {', '.join(allowed)}, got '{value}'",
                          file=where)


def validate(cfg: TrainConfig, where: str | None = None) -> None:
    """Check choices and ranges; raise ConfigError naming the key."""
    for key in ("spec", "model", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"'{key}' is required", file=where)
    _choice(cfg.objective, OBJECTIVES, "objective", where)
    _choice(cfg.precision, PRECISIONS, "precision", where)
    if cfg.preprocess is not None:
        _choice(cfg.preprocess, ("reference", "pad", "resize", "processor"), "preprocess",
                where)
    if cfg.max_num_patches is not None and (isinstance(cfg.max_num_patches, bool) or not
                                            isinstance(cfg.max_num_patches, int)
                                            or cfg.max_num_patches < 1):
        raise ConfigError(f"'max_num_patches' must be a positive integer, got "
                          f"{cfg.max_num_patches!r}", file=where)
    if cfg.blend and (cfg.objective == "probe"
                      or any(not 0.0 <= float(a) <= 1.0 for a in cfg.blend)):
        raise ConfigError("'blend': alphas in [0, 1], for contrastive / classify fine-tunes",
                          file=where)
    _choice(cfg.probe.kind, ("logistic", "mlp"), "probe.kind", where)
    if not cfg.probe.hidden or any(h < 1 for h in cfg.probe.hidden):
        raise ConfigError("probe.hidden: one or more layer widths >= 1, e.g. [512, 256]",
                          file=where)
    _choice(cfg.data.text, TEXT_SOURCES, "data.text", where)
    _choice(cfg.contrastive.loss, LOSSES, "contrastive.loss", where)
    _choice(cfg.contrastive.positives, POSITIVES, "contrastive.positives", where)
    _choice(cfg.adapt.method, METHODS, "adapt.method", where)
    o, e, a = cfg.optim, cfg.eval, cfg.adapt
    checks = [
        (o.epochs >= 1, "optim.epochs must be >= 1"),
        (o.max_steps is None or o.max_steps >= 1, "optim.max_steps must be >= 1"),
        (o.batch_size >= 1, "optim.batch_size must be >= 1"),
        (o.grad_accum >= 1, "optim.grad_accum must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= o.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)"),
        (o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip must be > 0 (or null)"),
        (e.eval_every >= 1, "eval.eval_every must be >= 1"),
        (e.save_every_steps is None or e.save_every_steps >= 1,
         "eval.save_every_steps must be >= 1 (or null)"),
        (e.best_mode in (None, "max", "min"), "eval.best_mode must be max or min"),
        (e.patience is None or e.patience >= 1, "eval.patience must be >= 1 (or null)"),
        (cfg.num_workers is None or cfg.num_workers >= 0, "num_workers must be >= 0"),
        (cfg.threads is None or cfg.threads >= 1, "threads must be >= 1 (or null)"),
        (cfg.prefetch >= 0, "prefetch must be >= 0"),
        (cfg.contrastive.chunk_size is None or cfg.contrastive.chunk_size >= 1,
         "contrastive.chunk_size must be >= 1"),
        (cfg.contrastive.supcon_weight >= 0, "contrastive.supcon_weight must be >= 0"),
        (cfg.contrastive.supcon_temperature > 0, "contrastive.supcon_temperature must be > 0"),
        (cfg.contrastive.hard_negatives_k >= 1, "contrastive.hard_negatives_k must be >= 1"),
        (a.lora.r >= 1, "adapt.lora.r must be >= 1"),
        (0 <= a.lora.dropout < 1, "adapt.lora.dropout must be in [0, 1)"),
        (bool(a.lora.target_modules), "adapt.lora.target_modules must not be empty"),
        (a.unfreeze_last_n_layers is None or a.unfreeze_last_n_layers >= 0,
         "adapt.unfreeze_last_n_layers must be >= 0"),
        (a.unfreeze_fraction is None or 0 < a.unfreeze_fraction <= 1,
         "adapt.unfreeze_fraction must be in (0, 1]"),
        (not (a.lock_text and a.lock_image), "adapt.lock_text and adapt.lock_image together "
                                             "leave nothing to train"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message, file=where)
    partial_set = a.unfreeze_last_n_layers is not None or a.unfreeze_fraction is not None
    if a.method == "partial" and not partial_set:
        raise ConfigError("adapt.method 'partial' needs adapt.unfreeze_last_n_layers or "
                          "adapt.unfreeze_fraction", file=where)
    if a.method != "partial" and partial_set:
        raise ConfigError("adapt.unfreeze_last_n_layers / unfreeze_fraction need "
                          "adapt.method: partial", file=where)
    if a.unfreeze_last_n_layers is not None and a.unfreeze_fraction is not None:
        raise ConfigError("set adapt.unfreeze_last_n_layers or adapt.unfreeze_fraction, "
                          "not both", file=where)
    _validate_thresholds(e.thresholds, where)
    _validate_safe_outputs(e, where)
    if cfg.data.oversample is not None:
        extra = set(cfg.data.oversample) - {"label", "min_count"}
        if extra or "label" not in cfg.data.oversample:
            raise ConfigError("data.oversample must be {label: NAME, min_count: N}",
                              file=where)


def _validate_thresholds(value: Any, where: str | None) -> None:
    if value == "youden":
        return
    if not isinstance(value, dict):
        raise ConfigError(f"eval.thresholds must be 'youden' or {{label: min sensitivity}}, "
                          f"got {value!r}", file=where)
    for label, sens in value.items():
        if isinstance(sens, bool) or not isinstance(sens, (int, float)) or not 0 < sens <= 1:
            raise ConfigError(f"eval.thresholds.{label} must be a sensitivity in (0, 1], "
                              f"got {sens!r}", file=where)


def _validate_safe_outputs(e: EvalConfig, where: str | None) -> None:
    alphas = e.alpha.items() if isinstance(e.alpha, dict) else [("", e.alpha)]
    for label, a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
            key = f"eval.alpha.{label}" if label else "eval.alpha"
            raise ConfigError(f"{key} must be an error rate in (0, 1), got {a!r}", file=where)
    f = e.ood_false_reject
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise ConfigError(f"eval.ood_false_reject must be in (0, 1), got {f!r}", file=where)


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
