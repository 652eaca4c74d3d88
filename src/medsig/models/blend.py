"""Weight-space blending of a fine-tune with the model it started from (WiSE-FT).

``blend(base, tuned, alphas, out)`` writes one model folder per alpha,
``θ(α) = (1 − α)·θ_base + α·θ_tuned`` for every tensor both checkpoints hold (α = 0: the
base weights, α = 1: the fine-tune). Tensors only the fine-tune has (a classifier head)
are kept as they are; a classifier head the base also has is interpolated only when both
record the same heads (labels and classes), else the fine-tune's is kept. Full and partial
fine-tunes blend the same way (frozen tensors are equal, so they stay unchanged). A LoRA
adapter folder (``adapter_config.json``) is blended by scaling the adapter:
``ΔW(α) = α·B·A``, i.e. ``lora_B`` times α, which is the same interpolation without
touching the base weights.

Each output is a copy of the fine-tune's folder (processor, tokenizer, ``medsig.json``,
the recorded preprocessing) with blended weights and ``medsig.json["blend"]`` =
``{"base", "tuned", "alpha"}``, so it loads, evaluates and serves like the fine-tune.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from medsig.errors import ConfigError
from medsig.models.artifact import Artifact, reference

WEIGHTS = "model.safetensors"
ADAPTER = "adapter_model.safetensors"
HEAD_PREFIXES = ("classifier.",)  # AutoModelForImageClassification's label heads
_SKIP = {WEIGHTS, ADAPTER, "model.safetensors.index.json", "checkpoints", "tensorboard",
         "blend", "ood.safetensors"}


def alpha_name(alpha: float) -> str:
    """Folder name of one blend: ``alpha-0.50``."""
    return f"alpha-{alpha:.2f}"


def parse_alphas(values: Iterable[str | float]) -> list[float]:
    """Alphas from CLI strings (``0.25`` or ``0,0.5,1``), each in [0, 1], sorted, unique."""
    out: set[float] = set()
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                a = float(part)
            except ValueError:
                raise ConfigError(f"--alpha '{part}' is not a number") from None
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"--alpha {a} is outside [0, 1] (0: the base, 1: the fine-tune)")
            out.add(round(a, 4))
    if not out:
        raise ConfigError("no --alpha given")
    return sorted(out)


def _weight_files(folder: Path) -> list[Path]:
    single = folder / WEIGHTS
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return []


def load_weights(name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (local folder or a hub id in the cache), via safetensors."""
    from safetensors.torch import load_file

    from medsig.models.encoder import resolve_cached

    folder = Path(resolve_cached(str(name_or_path)))
    files = _weight_files(folder) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"no safetensors weights in '{name_or_path}' (model.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _base_key(key: str, base: dict[str, torch.Tensor]) -> str | None:
    """The base tensor matching a fine-tune key (classifiers keep the tower's names)."""
    if key in base:
        return key
    for prefix in ("model.", "base_model.model."):
        if key.startswith(prefix) and key[len(prefix):] in base:
            return key[len(prefix):]
    return None


def blend_state(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                keep: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], int]:
    """(blended state, number of tensors interpolated); fine-tune-only tensors kept, and
    those whose key starts with one of ``keep`` (heads the base trained for other labels)."""
    out: dict[str, torch.Tensor] = {}
    shared = 0
    for key, t in tuned.items():
        b = None if key.startswith(keep) else _base_key(key, base)
        if b is None or not t.is_floating_point() or base[b].shape != t.shape:
            out[key] = t.clone()
            continue
        mixed = base[b].float() * (1.0 - alpha) + t.float() * alpha
        out[key] = mixed.to(t.dtype).contiguous()
        shared += 1
    return out, shared


def scale_adapter(adapter: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """LoRA blend: every ``lora_B`` (and ``lora_embedding_B``) tensor times alpha."""
    return {k: (t.float() * alpha).to(t.dtype) if ("lora_B" in k or "lora_embedding_B" in k)
            else t.clone() for k, t in adapter.items()}


def _read_meta(folder: Path) -> dict:
    art = Artifact.find(folder)
    return art.to_dict() if art is not None else {}


def _heads(meta: dict) -> list[tuple[str, tuple[str, ...]]]:
    return [(h.get("name"), tuple(h.get("classes") or ())) for h in meta.get("heads") or []]


def _keep_heads(base: str | Path, tuned_meta: dict) -> tuple[str, ...]:
    """The classifier's tensors are interpolated only when the base recorded the same heads
    (names and classes, in order); else they are the fine-tune's (a base head of equal shape
    was trained for other labels: mixing it in would be meaningless)."""
    from medsig.models.encoder import resolve_cached

    folder = Path(resolve_cached(str(base)))
    same = folder.is_dir() and _heads(tuned_meta) and \
        _heads(_read_meta(folder)) == _heads(tuned_meta)
    return () if same else HEAD_PREFIXES


def _write_meta(tuned: Path, tmp: Path, dst: Path, blend_info: dict) -> None:
    """The fine-tune's medsig.json re-pointed for ``dst`` with a ``blend`` section (through
    the model-folder contract); a folder without one gets ``blend.json`` only."""
    art = Artifact.find(tuned)
    if art is None:
        (tmp / "blend.json").write_text(json.dumps(blend_info, indent=2) + "\n")
        return
    art = art.moved(tuned, dst)
    # the fine-tune's calibration / conformal / OOD data describe other weights: dropped
    # (refit with `medsig model safety DIR`)
    art.calibration = art.conformal = art.ood = None
    art.extras["blend"] = blend_info
    art.save(tmp)


def _copy_folder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in _SKIP or item.name.startswith("alpha-"):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)


def blend(base: str | Path, tuned: str | Path, alphas: Sequence[float], out: str | Path
          ) -> list[Path]:
    """Write ``out/alpha-X.XX`` for each alpha; returns the folders (see module docstring)."""
    from safetensors.torch import save_file

    tuned_dir, out = Path(tuned), Path(out)
    if not tuned_dir.is_dir():
        raise ConfigError(f"fine-tuned model folder not found: '{tuned}'")
    meta = _read_meta(tuned_dir)
    if meta.get("objective") == "probe":
        raise ConfigError(f"'{tuned}' is a probe: it has no fine-tuned encoder weights to blend")
    adapter = (tuned_dir / "adapter_config.json").is_file()
    if adapter:
        from safetensors.torch import load_file

        tuned_state, base_state = load_file(str(tuned_dir / ADAPTER)), {}
    else:
        tuned_state, base_state = load_weights(tuned_dir), load_weights(base)
    keep = _keep_heads(base, meta) if not adapter else ()
    written: list[Path] = []
    for alpha in alphas:
        dst = out / alpha_name(alpha)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _copy_folder(tuned_dir, tmp)
        if adapter:
            state, shared = scale_adapter(tuned_state, alpha), -1
        else:
            state, shared = blend_state(base_state, tuned_state, alpha, keep)
            if shared == 0:
                raise ConfigError(f"'{tuned}' and '{base}' share no weight tensor: "
                                  "is BASE the model the fine-tune started from?")
        save_file(state, str(tmp / (ADAPTER if adapter else WEIGHTS)), metadata={"format": "pt"})
        _write_meta(tuned_dir, tmp, dst, {
            "base": reference(base, dst), "tuned": reference(tuned_dir, dst), "alpha": alpha,
            "method": "lora_scale" if adapter else "interpolate",
            "tensors_interpolated": shared})
        shutil.rmtree(dst, ignore_errors=True)
        tmp.replace(dst)
        written.append(dst)
    return written
