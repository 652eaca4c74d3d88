"""The model-folder contract: what a medsig model folder holds (``medsig.json``).

``Artifact`` is the one typed record that training writes and that prediction, evaluation
and serving read (``Artifact.load(folder)`` / ``artifact.save(folder)``). It names

- ``objective`` (contrastive / classify / probe) and ``adaptation`` (full / partial /
  lora-merged / lora-adapter / frozen); ``kind`` combines them (full, partial, lora-merged,
  lora-adapter, classify, probe, contrastive-zero-shot);
- ``base_model``: a hub id, or a path *relative to the folder* (so the folder can move with
  its base); ``encoder``: where the image encoder loads from ("." = this folder);
- ``preprocessing``: how images become pixels (pad to square or resize, size, mean, std,
  resampling) so that training, evaluation, serving and the saved processor agree;
- ``heads`` (``medsig.models.heads.Head``: classes / states, thresholds, rules), zero-shot
  ``prompts``, ``metrics``, the spec and split fingerprints, package ``versions``;
- optional sections for later stages: ``calibration``, ``conformal``, ``ood`` (None unless
  written) and ``extras`` (any other top-level key, kept as it was on a round trip).

No absolute local path is written: paths are stored relative to the folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medsig.errors import ConfigError
from medsig.models.heads import Head, heads_of

FILE = "medsig.json"
SCHEMA_VERSION = 2
OBJECTIVES = ("contrastive", "classify", "probe", "zeroshot")
ADAPTATIONS = ("full", "partial", "lora-merged", "lora-adapter", "frozen")
KINDS = ("full", "partial", "lora-merged", "lora-adapter", "classify", "probe",
         "contrastive-zero-shot")
ADAPTER_CONFIG = "adapter_config.json"


# -- paths -------------------------------------------------------------------------------------
def is_local(ref: str) -> bool:
    """True when ``ref`` names an existing file-system path (else: a hub id)."""
    return bool(ref) and Path(ref).exists()


def reference(ref: str | Path, folder: str | Path) -> str:
    """How ``folder``'s medsig.json names ``ref``: a hub id as it is, a local path relative
    to ``folder`` (POSIX separators; "." for the folder itself)."""
    ref = str(ref)
    if not is_local(ref):
        return ref
    rel = Path(os.path.relpath(Path(ref).resolve(), Path(folder).resolve())).as_posix()
    return rel if rel.startswith(".") else f"./{rel}"


def resolve(ref: str | None, folder: str | Path | None) -> str | None:
    """The loadable form of a reference: a relative path joined to ``folder`` when it exists
    there, else ``ref`` unchanged (a hub id)."""
    if not ref or folder is None:
        return ref
    if Path(ref).is_absolute():
        return ref
    candidate = Path(folder) / ref
    if candidate.exists():
        return str(candidate.resolve())
    return ref


def hub_id(ref: str | None, folder: str | Path | None = None, depth: int = 4) -> str | None:
    """The hub id a model derives from: ``ref`` itself when it is not a local path, else the
    ``base_model`` recorded in that folder's medsig.json (followed up to ``depth`` links)."""
    if not ref:
        return None
    path = resolve(ref, folder)
    if path is None or not is_local(path):
        return None if ref.startswith((".", "/", "~", "\\")) or ":" in ref else ref
    meta = Path(path) / FILE
    if depth <= 0 or not meta.is_file():
        return None
    try:
        base = json.loads(meta.read_text()).get("base_model")
    except (OSError, json.JSONDecodeError):
        return None
    return hub_id(base, path, depth - 1) if isinstance(base, str) else None


# -- sections ----------------------------------------------------------------------------------
@dataclass
class Preprocessing:
    """Image -> pixels: ``mode`` reference (the model family's published pipeline) / pad
    (zero-pad to square, then resize) / resize / processor; ``resize_method`` pil or
    tf_bilinear (MedSigLIP's notebook), ``shortest_edge`` + centre crop (CLIP);
    ``max_num_patches`` / ``patch_size``: SigLIP 2 NaFlex (aspect kept, at most that many
    patches; ``medsig.models.naflex``)."""

    mode: str = "pad"
    size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    resample: int | None = None  # PIL code (3 = bicubic)
    resize_method: str = "pil"
    shortest_edge: int | None = None
    rescale: float | None = None  # pixel scale before normalising (default 1 / 255)
    patch_size: int | None = None  # NaFlex
    max_num_patches: int | None = None  # NaFlex

    @classmethod
    def of(cls, preprocess: Any) -> Preprocessing:
        """From a ``medsig.data.transforms.Preprocess``."""
        rescale = getattr(preprocess, "rescale", None)
        return cls(str(preprocess.mode), int(preprocess.size),
                   [round(float(v), 6) for v in preprocess.mean.flatten().tolist()],
                   [round(float(v), 6) for v in preprocess.std.flatten().tolist()],
                   int(preprocess.resample) if preprocess.resample is not None else None,
                   str(getattr(preprocess, "resize_method", "pil")),
                   getattr(preprocess, "shortest_edge", None),
                   None if rescale is None or abs(rescale - 1 / 255) < 1e-12 else float(rescale),
                   getattr(preprocess, "patch_size", None),
                   getattr(preprocess, "max_num_patches", None))

    def build(self, processor: Any = None) -> Any:
        """The ``Preprocess`` this record describes (missing fields from ``processor``)."""
        from medsig.data.transforms import Preprocess

        if self.max_num_patches is not None and self.mode == "processor" \
                and processor is not None:
            from medsig.models.naflex import NaflexPreprocess

            return NaflexPreprocess.from_processor(processor, "processor", self.max_num_patches)
        if self.size is None or self.mean is None or self.std is None or self.mode == "processor":
            if processor is None:
                raise ConfigError("medsig.json: preprocessing is incomplete and no image "
                                  "processor was given")
            return Preprocess.from_processor(processor, mode=self.mode)
        kwargs: dict[str, Any] = {} if self.resample is None else {"resample": self.resample}
        if self.rescale is not None:
            kwargs["rescale"] = self.rescale
        if self.max_num_patches is not None:
            from medsig.models.naflex import NaflexPreprocess

            return NaflexPreprocess(self.patch_size or 16, self.max_num_patches, self.mean,
                                    self.std, mode="reference", **kwargs)
        return Preprocess(self.size, self.mean, self.std, mode=self.mode,
                          resize_method=self.resize_method, shortest_edge=self.shortest_edge,
                          **kwargs)


@dataclass
class DataRef:
    """The dataset spec (name, path relative to the folder) and its content fingerprint."""

    name: str | None = None
    path: str | None = None
    fingerprint: str | None = None


@dataclass
class SplitRef:
    fingerprint: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    note: str | None = None


def package_versions() -> dict[str, str]:
    """Versions of medsig and the libraries a folder's weights depend on."""
    from importlib.metadata import PackageNotFoundError, version

    from medsig import __version__

    out = {"medsig": __version__}
    for pkg in ("torch", "transformers", "peft", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


# -- the record --------------------------------------------------------------------------------
@dataclass
class Artifact:
    """Everything a medsig model folder records (see module docstring)."""

    objective: str
    base_model: str | None = None
    adaptation: str = "full"
    encoder: str = "."
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    heads: list[Head] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    name: str | None = None
    spec: DataRef = field(default_factory=DataRef)
    split: SplitRef = field(default_factory=SplitRef)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None
    history: str | None = None
    versions: dict[str, str] = field(default_factory=package_versions)
    calibration: dict[str, Any] | None = None  # e.g. a temperature per head
    conformal: dict[str, Any] | None = None    # e.g. conformal thresholds per head
    ood: dict[str, Any] | None = None          # e.g. embedding statistics for OOD scores
    extras: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    # -- what it is ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """full / partial / lora-merged / lora-adapter (contrastive), classify, probe, or
        contrastive-zero-shot (an image-text checkpoint used zero-shot)."""
        if self.objective in ("classify", "probe"):
            return self.objective
        if self.objective == "zeroshot":
            return "contrastive-zero-shot"
        return self.adaptation

    @property
    def base_hub_id(self) -> str | None:
        return hub_id(self.base_model)

    def head_size(self) -> int:
        return sum(h.size for h in self.heads)

    def encoder_source(self, folder: str | Path) -> str:
        """Where to load the image encoder from, resolved against ``folder``."""
        return str(resolve(self.encoder or ".", folder))

    def base_source(self, folder: str | Path) -> str | None:
        return resolve(self.base_model, folder)

    def spec_path(self, folder: str | Path) -> Path | None:
        path = resolve(self.spec.path, folder)
        return Path(path) if path and Path(path).is_file() else None

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.schema, "medsig_version":
                               self.versions.get("medsig"), "kind": self.kind}
        for f in fields(self):
            if f.name in ("extras", "schema"):
                continue
            value = getattr(self, f.name)
            if f.name == "heads":
                value = [h.to_dict() for h in value]
            elif f.name in ("preprocessing", "spec", "split"):
                value = {k.name: getattr(value, k.name) for k in fields(value)}
            elif f.name in ("calibration", "conformal", "ood", "probe") and value is None:
                continue
            out[f.name] = value
        out.update({k: v for k, v in self.extras.items() if k not in out})
        return clean_json(out)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Any = None) -> Artifact:
        """From a medsig.json dict (schema 2, or the older flat schema 1)."""
        if not isinstance(raw, dict) or "objective" not in raw:
            raise ConfigError("medsig.json has no 'objective'", file=source)
        known = {f.name for f in fields(cls)} | {"kind", "medsig_version", "preprocess",
                                                 "image_size"}
        pre = raw.get("preprocessing")
        if isinstance(pre, dict):
            names = [f.name for f in fields(Preprocessing)]
            preprocessing = Preprocessing(**{k: pre[k] for k in names if pre.get(k) is not None})
        else:  # schema 1: a mode and a size; mean / std from the saved image processor
            preprocessing = Preprocessing(str(raw.get("preprocess") or "pad"),
                                          raw.get("image_size"))
        spec = raw.get("spec") or {}
        split = raw.get("split") or {}
        adaptation = raw.get("adaptation") or _adaptation_v1(raw)
        try:
            return cls(
                objective=str(raw["objective"]), base_model=raw.get("base_model"),
                adaptation=str(adaptation), encoder=str(raw.get("encoder") or "."),
                preprocessing=preprocessing, heads=heads_of(raw.get("heads") or []),
                labels=list(raw.get("labels") or []), prompts=dict(raw.get("prompts") or {}),
                name=raw.get("name"),
                spec=DataRef(spec.get("name"), spec.get("path"), spec.get("fingerprint")),
                split=SplitRef(split.get("fingerprint"), dict(split.get("counts") or {}),
                               split.get("note")),
                metrics=dict(raw.get("metrics") or {}), training=dict(raw.get("training") or {}),
                config=dict(raw.get("config") or {}), probe=raw.get("probe"),
                history=raw.get("history"),
                versions=dict(raw.get("versions") or
                              {"medsig": str(raw.get("medsig_version", "0"))}),
                calibration=raw.get("calibration"), conformal=raw.get("conformal"),
                ood=raw.get("ood"), extras={k: v for k, v in raw.items() if k not in known},
                schema=int(raw.get("schema") or 1))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"medsig.json does not match the model-folder schema: {exc}",
                              file=source) from None

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/medsig.json`` (strict JSON, atomically)."""
        path = Path(folder) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        """Read ``folder/medsig.json``; ConfigError naming the file when it is unreadable."""
        path = Path(folder) / FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("not a medsig model folder (no medsig.json)", file=path) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"unreadable medsig.json: {exc}", file=path) from None
        if int(raw.get("schema") or 1) > SCHEMA_VERSION if isinstance(raw, dict) else False:
            raise ConfigError(f"medsig.json schema {raw.get('schema')} is newer than this "
                              f"medsig reads ({SCHEMA_VERSION}): upgrade medsig", file=path)
        return cls.from_dict(raw, source=path)

    def moved(self, src: str | Path, dst: str | Path) -> Artifact:
        """This record as written in ``dst`` for a folder copied from ``src``: every local
        reference (base, encoder, spec, config paths) re-pointed relative to ``dst``."""
        import copy

        def move(ref: Any) -> Any:
            if not isinstance(ref, str) or ref == ".":
                return ref
            found = resolve(ref, src)
            return reference(found, dst) if found != ref else ref

        art = copy.deepcopy(self)
        art.base_model, art.encoder = move(art.base_model), move(art.encoder)
        art.spec.path = move(art.spec.path)
        for key in ("spec", "model"):
            if key in art.config:
                art.config[key] = move(art.config[key])
        return art

    @classmethod
    def find(cls, model: str | Path) -> Artifact | None:
        """The record of a model folder, or None (a hub id or a folder without medsig.json)."""
        folder = Path(model)
        if not (folder / FILE).is_file():
            return None
        return cls.load(folder)


def _adaptation_v1(raw: dict[str, Any]) -> str:
    if raw.get("objective") == "probe":
        return "frozen"
    adapt = (raw.get("config") or {}).get("adapt") or {}
    method = adapt.get("method", "full")
    if method == "lora":
        return "lora-merged" if (adapt.get("lora") or {}).get("merge", True) else "lora-adapter"
    return str(method)


def adaptation_of(adapt_cfg: Any) -> str:
    """The ``adaptation`` of a training run from its ``AdaptConfig``."""
    if adapt_cfg.method == "lora":
        return "lora-merged" if adapt_cfg.lora.merge else "lora-adapter"
    return str(adapt_cfg.method)


def clean_json(value: Any) -> Any:
    """A strict-JSON copy: numpy scalars / arrays to Python, NaN / inf to None, paths to
    strings, tuples to lists, dict keys to strings."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_adapter_base(folder: str | Path, base: str) -> None:
    """Record the LoRA adapter's base in ``adapter_config.json`` so that plain peft /
    transformers load it from any working directory: the hub id when the base derives from
    one, else the base folder's absolute path (medsig.json keeps the folder-relative one,
    which ``adapter_base`` falls back to when the folders moved together)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = hub_id(base) or str(Path(base).resolve())
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def adapter_base(folder: str | Path) -> str:
    """The loadable base of the LoRA adapter in ``folder``: adapter_config.json's base when
    it exists (or is a hub id), else medsig.json's folder-relative ``base_model``."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"unreadable adapter config: {exc}", file=path) from None
    if base and (is_local(str(base)) or hub_id(str(base)) == base):
        return str(base)
    art = Artifact.find(folder)
    fallback = art.base_source(folder) if art is not None else None
    if fallback and (is_local(fallback) or hub_id(fallback) == fallback):
        return fallback
    raise ConfigError(f"the LoRA adapter's base model '{base}' is not found: put it back, or "
                      "set base_model_name_or_path in adapter_config.json to its hub id or "
                      "folder", file=path)


PROCESSOR_MODULE = "image_processing_medsig.py"


def write_image_processor(folder: str | Path, pre: Preprocessing) -> Path:
    """Save the image processor that reproduces ``pre`` in plain transformers
    (``AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)``): medsig's
    ``hf_image_processor.py`` copied as ``image_processing_medsig.py`` and a
    ``preprocessor_config.json`` naming it in ``auto_map``."""
    import shutil

    from medsig.models import hf_image_processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_image_processor.__file__, folder / PROCESSOR_MODULE)
    config = {
        "image_processor_type": "MedsigImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_medsig.MedsigImageProcessor"},
        "pad_to_square": pre.mode == "pad", "size": {"height": pre.size, "width": pre.size},
        "resample": 3 if pre.resample is None else pre.resample, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": pre.mean, "image_std": pre.std, "do_convert_rgb": True,
        "do_center_crop": False,
    }
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class _DefaultConfigTokenWarning(logging.Filter):
    """Drops transformers' "bos_token_id must be `None` or an integer within the vocabulary"
    raised while ``save_pretrained`` diffs a config against its class default: SigLIP's
    default text config carries CLIP's token ids (49406 / 49407) outside its own 32,000
    vocabulary, so every save logged a warning about a config nobody wrote."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "an integer within the vocabulary" not in record.getMessage()


def save_model(model: Any, out: str | Path, **kwargs: Any) -> None:
    """``model.save_pretrained(out, **kwargs)`` without that spurious warning (a saved
    config with genuinely bad ids still warns when it is loaded)."""
    logger = logging.getLogger("transformers.configuration_utils")
    quiet = _DefaultConfigTokenWarning()
    logger.addFilter(quiet)
    try:
        model.save_pretrained(out, **kwargs)
    finally:
        logger.removeFilter(quiet)
