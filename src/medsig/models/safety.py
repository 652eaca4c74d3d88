"""A model folder's safe-output data: temperatures, conformal thresholds and the OOD gate.

Stored beside ``medsig.json``: ``safety.json`` (calibration temperatures, conformal
``alpha`` / ``qhat`` per head, OOD settings) and ``ood.safetensors`` (reference embeddings).
Training writes them (``medsig.train.safety``); ``load_predictor`` reads them, so serving
and evaluation use the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError
from medsig.models.calibration import apply_calibration, scale_probs
from medsig.models.conformal import prediction_sets
from medsig.models.heads import Head
from medsig.models.ood import OodGate

SAFETY_FILE = "safety.json"
OOD_FILE = "ood.safetensors"


@dataclass
class Safety:
    calibration: dict[str, list[float]] = field(default_factory=dict)
    conformal: dict[str, dict[str, Any]] = field(default_factory=dict)
    ood: OodGate | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def calibrate(self, heads: list[Any], probs: Any) -> np.ndarray:
        if not self.calibration:
            return np.asarray(probs, dtype=np.float32)
        return apply_calibration(heads, self.calibration, probs)

    def uncalibrate(self, heads: list[Any], probs: Any) -> np.ndarray:
        if not self.calibration:
            return np.asarray(probs, dtype=np.float32)
        return apply_calibration(heads, self.calibration, probs, invert=True)

    def calibrated_heads(self, heads: list[Any]) -> list[Any]:
        """medsig.json head dicts with thresholds mapped through the temperatures: the same
        decisions on calibrated probabilities as the saved thresholds on raw ones."""
        out = []
        for head in heads:
            h, temps = dict(head), self.calibration.get(head["name"])
            if temps and h.get("kind") != "multiclass" and h.get("thresholds"):
                h["thresholds"] = [round(float(scale_probs(np.array([t]), "binary",
                                                           float(temp))[0]), 6)
                                   for t, temp in zip(h["thresholds"], temps)]
            out.append(h)
        return out

    def sets(self, head: Any, probs_row: Any) -> list[list[str]] | None:
        """The conformal set(s) of one image for one head: a list of class names per
        conformal output (binary: one set of states; multilabel: one per class)."""
        h = Head.of(head)
        entry = self.conformal.get(h.name)
        if entry is None:
            return None
        block = np.asarray(probs_row, dtype=np.float64).reshape(1, -1)[:, h.cols]
        members = prediction_sets(h, entry, block)
        if h.kind == "multiclass":
            return [[c for c, m in zip(h.classes, members[0][0]) if m]]
        states = (h.classes + ["absent", "present"][len(h.classes):])[:2] \
            if h.kind == "binary" else ["absent", "present"]
        return [[s for s, m in zip(states, mem[0]) if m] for mem in members]

    def to_json(self) -> dict[str, Any]:
        return {"calibration": {"method": "temperature", "temperatures": self.calibration},
                "conformal": self.conformal,
                "ood": self.ood.info() if self.ood is not None else None,
                "fitted_on": self.fitted_on}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        if self.ood is not None:
            self.ood.save(folder / OOD_FILE)
        (folder / SAFETY_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_safety(folder: str | Path | None) -> Safety | None:
    """The folder's safety data, or None when it has none (an older model)."""
    if folder is None or not (Path(folder) / SAFETY_FILE).is_file():
        return None
    path = Path(folder) / SAFETY_FILE
    try:
        raw = json.loads(path.read_text())
        temps = {str(k): [float(t) for t in v]
                 for k, v in (raw.get("calibration") or {}).get("temperatures", {}).items()}
        conformal = dict(raw.get("conformal") or {})
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"unreadable safety data: {str(exc)[:120]}", file=path) from None
    ood = OodGate.load(Path(folder) / OOD_FILE) if raw.get("ood") else None
    return Safety(temps, conformal, ood, dict(raw.get("fitted_on") or {}))
