"""A model folder's safe-output data: calibration, conformal thresholds and the OOD gate.

Stored through the model-folder contract (``medsig.models.artifact``): the ``calibration``
(Platt / temperature parameters per head), ``conformal`` (``alpha`` / ``qhat`` per head)
and ``ood`` (method, threshold, false-reject target) sections of ``medsig.json``, and the
gate's statistics in ``ood.safetensors``. Training writes them (``medsig.train.safety``);
``load_predictor`` reads them, so serving and evaluation use the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError
from medsig.models.calibration import apply_calibration, transform
from medsig.models.conformal import prediction_sets
from medsig.models.heads import Head
from medsig.models.ood import OodGate

OOD_FILE = "ood.safetensors"


@dataclass
class Safety:
    calibration: dict[str, list[list[float]]] = field(default_factory=dict)  # [[a, b], ...]
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

    def calibrated_heads(self, heads: list[Any]) -> list[Head]:
        """Heads with thresholds mapped through the calibration: the same decisions on
        calibrated probabilities as the saved thresholds on raw ones."""
        out = []
        for h in map(Head.of, heads):
            pairs = self.calibration.get(h.name)
            if pairs and h.kind != "multiclass" and h.thresholds:
                h = h.with_thresholds([round(float(transform(np.array([t]), "binary", a, b)[0]),
                                             6) for t, (a, b) in zip(h.thresholds, pairs)],
                                      h.threshold_rule)
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
        states = h.states if h.kind == "binary" else ["absent", "present"]
        return [[s for s, m in zip(states, mem[0]) if m] for mem in members]

    def save(self, folder: str | Path) -> None:
        """Write the three sections into ``folder/medsig.json`` (+ ``ood.safetensors``)."""
        from medsig.models.artifact import Artifact

        folder = Path(folder)
        art = Artifact.load(folder)
        art.calibration = {"method": "platt (sigmoid outputs) / temperature (multiclass)",
                           "formula": "p' = sigmoid(a * logit(p) + b); multiclass "
                                      "p' = softmax(a * log p)",
                           "params": self.calibration, "fitted_on": self.fitted_on}
        art.conformal = {"score": "1 - probability of the true state / class",
                         "heads": self.conformal}
        art.ood = None
        if self.ood is not None:
            self.ood.save(folder / OOD_FILE)
            art.ood = {**self.ood.info(), "file": OOD_FILE}
        art.save(folder)


def load_safety(artifact: Any, folder: str | Path | None) -> Safety | None:
    """The folder's safety data from its Artifact, or None when it has none."""
    if artifact is None or folder is None or not (artifact.calibration or artifact.conformal
                                                  or artifact.ood):
        return None
    try:
        cal = artifact.calibration or {}
        temps = {str(k): [[float(a), float(b)] for a, b in v]
                 for k, v in (cal.get("params") or {}).items()}
        conformal = dict((artifact.conformal or {}).get("heads") or {})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"medsig.json: unreadable calibration / conformal section: "
                          f"{str(exc)[:120]}", file=Path(folder) / "medsig.json") from None
    ood = None
    if artifact.ood:
        ood = OodGate.load(Path(folder) / str(artifact.ood.get("file") or OOD_FILE))
    return Safety(temps, conformal, ood, dict(cal.get("fitted_on") or {}))
