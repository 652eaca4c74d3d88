"""Spec parsing, its errors, and label encoding (MISSING -> -1, coarse maps, exclusions)."""

from __future__ import annotations

import numpy as np
import pytest

from medsig.data.collection import load_collection
from medsig.errors import DataError, SpecError
from medsig.spec import DatasetSpec
from tests.conftest import WOUND_CSV, WOUND_SPEC, write_wound_spec


def test_spec_round_trip(wound_spec):
    spec = DatasetSpec.load(wound_spec)
    assert spec.image_column == "file" and spec.group_column == "patient"
    assert spec.label_names == ["urgency", "erythema", "infection_risk", "condition", "category"]
    assert spec.label("category").coarse.mapping["Wart"] == "Infection"
    again = DatasetSpec.from_dict(spec.to_dict(), path=wound_spec)
    assert again.to_dict() == spec.to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("columns:", "colums:"), "unknown key 'colums'"),
        (("  group: patient", "  group: patient\n  patient: x"), "unknown key 'columns.patient'"),
        (("type: multiclass", "type: ordinal"), "expected one of binary, multiclass"),
        (("    negative: [Green]\n", ""), "needs both 'positive' and 'negative'"),
        (("map: coarse.json", "map: nope.json"), "file not found"),
        (("name: wounds", "name: [wounds"), "invalid YAML"),
        (("    positive: [Present]", "    positive: [Present, Absent]"), "in both positive"),
    ],
)
def test_spec_errors_are_one_line_and_name_the_key(tmp_path, edit, message):
    path = write_wound_spec(tmp_path, WOUND_SPEC.replace(*edit))
    with pytest.raises(SpecError) as err:
        DatasetSpec.load(path)
    text = str(err.value)
    assert message in text and "spec.yaml" in text and "\n" not in text


def test_label_encoding(wound_spec):
    col = load_collection(wound_spec)
    assert len(col) == 5 and col.ids[0] == "a1"
    assert col.labels["urgency"].targets.tolist() == [0, 1, 1, -1, 0]
    # MISSING and empty are both missing, distinct from negatives
    assert col.labels["erythema"].targets.tolist() == [0, 1, -1, -1, 0]
    # mapping low -> Low, MISSING -> -1
    assert col.labels["infection_risk"].targets.tolist() == [0, 2, 0, 1, -1]
    cond = col.labels["condition"]
    assert cond.classes == ["Eczema", "Impetigo", "Mole", "Wart"]
    assert cond.targets[1].tolist() == [1, 1, 0, 0]
    assert cond.targets[3].tolist() == [-1, -1, -1, -1]  # an empty list carries no label
    assert cond.weights[1].tolist() == pytest.approx([0.3, 0.7, 0, 0])
    cat = col.labels["category"]
    assert cat.classes == ["Infection", "Inflammatory"]  # "Other" excluded
    assert cat.targets[:, 0].tolist() == [0, 1, 1, -1, 0]
    assert cat.targets[4].tolist() == [0, 0]  # only Mole (Other): negative for every class
    assert cat.weights[1].tolist() == pytest.approx([0.7, 0.3])
    assert col.labels["urgency"].readable(1) == "needs attention"
    assert col.groups.tolist() == ["p1", "p1", "p2", "p3", "p4"]


def test_texts_from_templates(wound_spec):
    col = load_collection(wound_spec)
    assert col.text(0) == "A post-surgical wound with no erythema."
    assert col.text(2) == "A medical image from wounds."  # erythema missing: no template fits


@pytest.mark.parametrize(
    ("edit", "row", "column", "message"),
    [
        (("a2,a2.png,p1,Red", "a2,a2.png,p1,Purple"), 2, "urgency_level", "'Purple'"),
        (("p2,Yellow,MISSING,low", "p2,Yellow,MISSING,Huge"), 3, "infection_risk",
         "not a class"),
        (("a5,a5.png", "a1,a5.png"), 5, "image_id", "duplicate id 'a1'"),
        (('"[""Wart""]"', '"[""Wart"""'), 3, "all_conditions", "cannot parse"),
    ],
)
def test_bad_values_name_file_row_column(tmp_path, edit, row, column, message):
    path = write_wound_spec(tmp_path, csv=WOUND_CSV.replace(*edit))
    with pytest.raises(DataError) as err:
        load_collection(path)
    text = str(err.value)
    assert f"wounds.csv: row {row}: column '{column}'" in text and message in text


def test_unknown_column_and_empty_table(tmp_path):
    path = write_wound_spec(tmp_path, WOUND_SPEC.replace("column: erythema", "column: redness"))
    with pytest.raises(DataError, match="column 'redness': unknown column"):
        load_collection(path)
    path = write_wound_spec(tmp_path, csv=WOUND_CSV.splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no rows"):
        load_collection(path)


def test_parquet_and_jsonl_tables(tmp_path, wound_spec):
    col = load_collection(wound_spec)
    frame = col.frame.copy()
    frame["all_conditions"] = [["Eczema"], ["Impetigo", "Eczema"], ["Wart"], [], ["Mole"]]
    for suffix in ("parquet", "jsonl"):
        out = tmp_path / f"wounds.{suffix}"
        if suffix == "parquet":
            frame.to_parquet(out)
        else:
            frame.to_json(out, orient="records", lines=True)
        spec = DatasetSpec.load(wound_spec)
        spec.table = out.name
        other = load_collection(spec)
        for name in ("urgency", "infection_risk", "condition", "category"):
            assert np.array_equal(other.labels[name].targets, col.labels[name].targets), name
