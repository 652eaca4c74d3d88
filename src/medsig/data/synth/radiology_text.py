"""ROCO-style captions for the generated radiology images (varied phrasing, real details)."""

from __future__ import annotations

from typing import Any

import numpy as np

LOBES = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe"}


def _study(f: dict[str, Any], rng: np.random.Generator) -> str:
    if f["body_part"] == "Knee":
        side = "right" if rng.random() < 0.5 else "left"
        return str(rng.choice([f"Anteroposterior radiograph of the {side} knee",
                               f"AP X-ray of the {side} knee", "Knee radiograph"]))
    if f["modality"] == "CT":
        return str(rng.choice(["Axial CT of the chest", "Chest CT", "Axial computed "
                               "tomography image of the thorax", "Contrast-enhanced chest CT"]))
    view = {"PA": ["Posteroanterior chest radiograph", "PA chest X-ray", "Chest X-ray"],
            "AP": ["Anteroposterior chest radiograph", "Portable AP chest X-ray",
                   "Chest X-ray"]}[f["view"]]
    return str(rng.choice(view))


def _finding_text(f: dict[str, Any], rng: np.random.Generator) -> str:
    side, finding = f["side"], f["finding"]
    extent = "small" if f["extent"] < 0.45 else "moderate" if f["extent"] < 0.75 else "large"
    if finding == "Normal":
        return str(rng.choice(["no acute abnormality", "clear lungs and a normal cardiac "
                               "silhouette", "normal findings"] if f["body_part"] == "Chest"
                              else ["no fracture or dislocation", "normal alignment"]))
    if finding == "Pneumonia":
        lobe = LOBES[(side, f["zone"])]
        return str(rng.choice([f"{lobe} consolidation",
                               f"patchy airspace opacity in the {lobe}, consistent with "
                               "pneumonia", f"consolidation of the {lobe} (arrow)"]))
    if finding == "Effusion":
        return str(rng.choice([f"a {extent} {side} pleural effusion",
                               f"a {extent} {side}-sided pleural effusion with blunting of "
                               "the costophrenic angle", f"{side} pleural effusion"]))
    if finding == "Nodule":
        lobe = LOBES[(side, f["zone"])]
        return str(rng.choice([f"a {f['size_mm']} mm nodule in the {lobe} (arrow)",
                               f"a well-defined pulmonary nodule in the {lobe}",
                               f"a solitary {f['size_mm']} mm {side} lung nodule"]))
    if finding == "Cardiomegaly":
        return str(rng.choice(["cardiomegaly", "an enlarged cardiac silhouette",
                               f"cardiomegaly with a cardiothoracic ratio of "
                               f"{f.get('ctr', 0.6):.2f}"]))
    if finding == "Pneumothorax":
        return str(rng.choice([f"a {side} pneumothorax",
                               f"a {extent} {side} pneumothorax with a visible visceral "
                               "pleural line", f"{side}-sided pneumothorax (arrows)"]))
    bone = "proximal tibia" if f["shift"] >= 0 else "tibial shaft"
    kind = "displaced" if abs(f["shift"]) > 0.02 else "non-displaced"
    return str(rng.choice([f"a {kind} fracture of the {bone}", f"a {bone} fracture",
                           f"a transverse fracture of the {bone} (arrow)"]))


def caption(f: dict[str, Any], rng: np.random.Generator) -> str:
    """One caption: study phrase + verb + finding, sometimes with a figure prefix."""
    verb = str(rng.choice(["showing", "demonstrating", "revealing", "with"]))
    text = f"{_study(f, rng)} {verb} {_finding_text(f, rng)}."
    if f["finding"] == "Normal" and rng.random() < 0.3:
        what = "knee radiograph" if f["body_part"] == "Knee" else (
            "chest CT" if f["modality"] == "CT" else "chest radiograph")
        text = f"Normal {what}."
    if rng.random() < 0.1:
        text = f"Figure {int(rng.integers(1, 6))}: {text}"
    return text
