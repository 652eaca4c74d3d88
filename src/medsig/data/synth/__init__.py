"""Generated datasets that mimic the three kinds of data medsig serves.

- ``derm``: SCIN-like skin photos (JPEG), cases of 1-3 photos, weighted differentials over
  53 fine conditions in 16 coarse categories (``condition_map.json``), Fitzpatrick types.
- ``wound``: SurgWound-like post-operative wound photos (JPEG) with healing, erythema,
  edema, exudate, infection risk and urgency; MISSING values at realistic rates.
- ``radiology``: ROCO-like grayscale X-ray / CT renderings (PNG) with captions and a finding.

Labels are visible in the pixels (each is drawn, not just written), so models can learn
them; nuisance (lighting, pose, zoom, noise, blur, JPEG quality) keeps it from being trivial.
Output is deterministic for a seed and written atomically (temp folder, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from medsig.errors import ConfigError

KINDS = ("derm", "wound", "radiology")
DEFAULT_N = {"derm": 600, "wound": 400, "radiology": 300}
MARKER = ".medsig-synth.json"


def synthesize(kind: str, out: str | Path, n: int | None = None, seed: int = 0,
               image_size: int = 128) -> Path:
    """Write a generated collection of `kind` into `out`; return the path of its spec.yaml.

    `out` must be absent, empty, or a previous synth output (which is replaced). Raises
    ConfigError for an unknown kind, bad sizes, or an `out` that holds other files.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown synth kind '{kind}' (choose from {', '.join(KINDS)})")
    n = DEFAULT_N[kind] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not 32 <= image_size <= 2048:
        raise ConfigError(f"image_size must be an integer in 32..2048, got {image_size!r}")
    out = Path(out)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        (tmp / "images").mkdir()
        spec = _build(kind, tmp, n, seed, image_size)
        _write_spec(tmp / "spec.yaml", spec)
        info = {"kind": kind, "n": n, "seed": seed, "image_size": image_size}
        (tmp / MARKER).write_text(json.dumps(info) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "spec.yaml"


def _build(kind: str, out: Path, n: int, seed: int, size: int) -> dict[str, Any]:
    if kind == "derm":
        from medsig.data.synth import derm as mod
    elif kind == "wound":
        from medsig.data.synth import wound as mod  # type: ignore[no-redef]
    else:
        from medsig.data.synth import radiology as mod  # type: ignore[no-redef]
    return mod.build(out, n, seed, size)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError("output path exists and is not a folder", file=out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError("output folder is not empty and is not a previous synth output; "
                          "choose another folder", file=out)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished temp folder to `out`, replacing an old synth output or empty dir."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_spec(path: Path, spec: dict[str, Any]) -> None:
    """Validate the spec through medsig.spec (catches contract drift), then write YAML."""
    from medsig.spec import DatasetSpec

    DatasetSpec.from_dict(spec, path=path)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100))


__all__ = ["DEFAULT_N", "KINDS", "synthesize"]
