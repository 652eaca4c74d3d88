"""Shared fixtures: small hand-written collections and the real data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI always has it)")
    return SHARED_DATA


WOUND_SPEC = """
name: wounds
table: wounds.csv
image_root: img
columns:
  image: file
  id: image_id
  group: patient
templates:
  - "A post-surgical wound with {erythema}."
labels:
  - name: urgency
    type: binary
    column: urgency_level
    positive: [Yellow, Red]
    negative: [Green]
    states: [home care, needs attention]
  - name: erythema
    type: binary
    column: erythema
    positive: [Present]
    negative: [Absent]
    states: [no erythema, erythema]
  - name: infection_risk
    type: multiclass
    column: infection_risk
    classes: [Low, Medium, High]
    mapping: {low: Low}
  - name: condition
    type: multilabel
    column: all_conditions
    weights_column: weighted_labels
    coarse:
      name: category
      map: coarse.json
      exclude: [Other]
"""

WOUND_CSV = """\
image_id,file,patient,urgency_level,erythema,infection_risk,all_conditions,weighted_labels
a1,a1.png,p1,Green,Absent,Low,"[""Eczema""]","{""Eczema"": 1.0}"
a2,a2.png,p1,Red,Present,High,"[""Impetigo"", ""Eczema""]","{""Impetigo"": 0.7, ""Eczema"": 0.3}"
a3,a3.png,p2,Yellow,MISSING,low,"[""Wart""]",
a4,a4.png,p3,MISSING,,Medium,[],
a5,a5.png,p4,Green,Absent,MISSING,"[""Mole""]","{""Mole"": 1.0}"
"""  # noqa: E501

COARSE = {"Eczema": "Inflammatory", "Impetigo": "Infection", "Wart": "Infection",
          "Mole": "Other"}


def write_wound_spec(tmp_path: Path, spec: str = WOUND_SPEC, csv: str = WOUND_CSV) -> Path:
    (tmp_path / "wounds.csv").write_text(csv)
    (tmp_path / "coarse.json").write_text(json.dumps(COARSE))
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    return path


@pytest.fixture
def wound_spec(tmp_path: Path) -> Path:
    return write_wound_spec(tmp_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SigLIP checkpoint (32 px), one per test module."""
    from medsig.models.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("model") / "siglip", arch="siglip", image_size=32)


@pytest.fixture(scope="module")
def encoder(tiny_model: Path):
    """The tiny checkpoint loaded as a medsig Encoder."""
    from medsig.models.encoder import Encoder

    return Encoder.load(tiny_model)
