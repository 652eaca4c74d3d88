"""Training defaults by starting point: a random model vs a pretrained checkpoint.

`detect_init` reads medsig's random-checkpoint marker; `apply_init_defaults` fills the
optimizer keys a config left unset (docs/training.md, "Defaults by starting point").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class OptimDefaults(Protocol):
    """The optimizer keys a starting point fills (``medsig.train.config.OptimConfig``)."""

    lr: float | None
    epochs: int | None
    warmup_ratio: float | None


# Defaults by starting point (docs/training.md, "Defaults by starting point"). A randomly
# initialised model has everything to learn: a large learning rate, a short warm-up and many
# epochs (tiny SigLIP on PneumoniaMNIST: test AUC 0.737 at 1e-5; 0.975 at 1e-3 x 20 epochs,
# bench/real.py).
# A pretrained checkpoint needs a small rate and few epochs, or it forgets what it knew.
INIT_DEFAULTS: dict[str, dict[str, float]] = {
    "random": {"lr": 1e-3, "epochs": 20, "warmup_ratio": 0.05},
    "pretrained": {"lr": 1e-5, "epochs": 5, "warmup_ratio": 0.1},
}
TINY_MARKER = "medsig_tiny.json"  # written by medsig.models.tiny: a random checkpoint


def detect_init(model: str) -> tuple[str, str]:
    """('random' | 'pretrained', why) for a model id or folder.

    Random: a medsig tiny checkpoint (its ``medsig_tiny.json`` marker), or a medsig output
    folder trained from one (followed through ``medsig.json`` base models). Anything else,
    hub ids included, counts as pretrained.
    """
    folder = Path(model) if model else None
    for _ in range(8):
        if folder is None or not folder.is_dir():
            break
        if (folder / TINY_MARKER).is_file():
            how = "" if folder == Path(model) else f" (trained by medsig from {folder})"
            return "random", f"a randomly initialised medsig tiny checkpoint{how}"
        try:
            base = json.loads((folder / "medsig.json").read_text()).get("base_model")
        except (OSError, ValueError, AttributeError):
            break
        if not isinstance(base, str) or not base or Path(base) == folder:
            break
        folder = Path(base) if Path(base).is_absolute() else (folder / base)
    return "pretrained", "not a medsig random checkpoint (hub id or trained weights)"


def apply_init_defaults(optim: OptimDefaults, init: str, model: str) -> str:
    """Fill ``optim``'s lr / epochs / warmup_ratio left unset from the defaults of the
    starting point (``init``: auto | random | pretrained, auto read from ``model``); return
    the line the training loop prints (what was chosen, and why)."""
    if init == "auto":
        kind, why = detect_init(model)
    else:
        kind, why = init, f"init: {init}"
    chosen = []
    for key, value in INIT_DEFAULTS[kind].items():
        given = getattr(optim, key)
        if given is None:
            setattr(optim, key, int(value) if key == "epochs" else float(value))
        chosen.append(f"{key} {getattr(optim, key):g}"
                      + (" (set)" if given is not None else ""))
    return (f"starting point: {kind} ({why}); {', '.join(chosen)}, cosine schedule "
            f"(defaults by starting point; change with init=random|pretrained or "
            f"optim.lr / optim.epochs / optim.warmup_ratio)")
