"""Splits: zero group leakage, label proportions, rare classes everywhere, reproducible."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medsig.data.collection import load_collection
from medsig.data.sampling import class_counts, oversample_indices
from medsig.data.split import set_spec_splits, split_collection, write_split

SPEC = """
name: cases
table: table.csv
columns: {image: file, id: image_id, group: case}
labels:
  - {name: urgent, type: binary, column: urgent, positive: ["1"], negative: ["0"]}
  - {name: site, type: multiclass, column: site}
  - {name: condition, type: multilabel, column: conditions}
"""


def _make(tmp_path, n_cases=300, seed=0):
    rng = np.random.default_rng(seed)
    conditions = [f"c{i}" for i in range(12)]
    freq = np.array([40, 30, 20, 10, 8, 6, 5, 4, 3, 3, 2, 1], dtype=float)
    rows = []
    for case in range(n_cases):
        k = rng.integers(1, 4)  # 1-3 images per case, same labels within a case
        cond = rng.choice(conditions, size=rng.integers(1, 3), replace=False, p=freq / freq.sum())
        urgent = str(int(rng.random() < 0.2))
        site = rng.choice(["arm", "leg", "face", "trunk"], p=[0.4, 0.3, 0.2, 0.1])
        for j in range(k):
            rows.append({"image_id": f"{case}_{j}", "file": f"{case}_{j}.png", "case": f"k{case}",
                         "urgent": urgent, "site": site, "conditions": json.dumps(list(cond))})
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return load_collection(tmp_path / "spec.yaml")


def test_split_has_no_group_leakage_and_follows_ratios(tmp_path):
    col = _make(tmp_path)
    res = split_collection(col, seed=3)
    for g in set(col.groups):
        assert len(set(res.split[col.groups == g])) == 1, g
    counts = res.counts()
    n = len(col)
    assert abs(counts["train"] / n - 0.7) < 0.05
    assert abs(counts["val"] / n - 0.15) < 0.05 and abs(counts["test"] / n - 0.15) < 0.05
    # every class's proportion in each split stays near the global proportion
    y = col.label_matrix()
    for j in range(y.shape[1]):
        total = y[:, j].sum()
        if total < 60:
            continue
        share = y[res.split == "train", j].sum() / total
        assert abs(share - 0.7) < 0.1, (j, share)


def test_rare_classes_with_three_groups_are_in_every_split(tmp_path):
    col = _make(tmp_path)
    res = split_collection(col, seed=1)
    cond = col.labels["condition"]
    for j, name in enumerate(cond.classes):
        carriers = cond.targets[:, j] > 0
        if len(set(col.groups[carriers])) >= 3:
            present = set(res.split[carriers])
            assert present == {"train", "val", "test"}, (name, present)


def test_same_seed_same_split_and_different_seed_differs(tmp_path):
    col = _make(tmp_path)
    a, b = split_collection(col, seed=7), split_collection(col, seed=7)
    c = split_collection(col, seed=8)
    assert (a.split == b.split).all()
    assert (a.split != c.split).any()


def test_write_split_and_spec_reads_it_back(tmp_path):
    col = _make(tmp_path, n_cases=60)
    res = split_collection(col, seed=0)
    splits, report = write_split(col, res, tmp_path)
    set_spec_splits(tmp_path / "spec.yaml", splits.name)
    again = load_collection(tmp_path / "spec.yaml")
    assert (again.split == res.split).all()
    table = pd.read_csv(report)
    rows = table[table["label"] == "(rows)"].iloc[0]
    assert rows["train"] + rows["val"] + rows["test"] == len(col)


def test_oversampling_touches_train_only(tmp_path):
    col = _make(tmp_path).with_split(split_collection(_make(tmp_path), seed=0).split)
    idx = oversample_indices(col, "condition", min_count=30, seed=0)
    assert set(col.split[idx]) == {"train"}
    before = class_counts(col, "condition", np.nonzero(col.split == "train")[0])
    after = class_counts(col, "condition", idx)
    assert any(0 < n < 30 for n in before.values())
    for name, n in before.items():
        if 0 < n < 30:
            assert after[name] >= 30, name
        if n >= 30:
            assert after[name] >= n
    with pytest.raises(Exception, match="no label named"):
        oversample_indices(col, "nope")


def test_rows_linked_by_near_duplicates_share_a_split(tmp_path):
    col = _make(tmp_path)
    groups = col.groups.astype(str)
    # five pairs of rows from different cases, chained through one case
    rows = [int(np.nonzero(groups == f"k{c}")[0][0]) for c in range(0, 60, 6)]
    together = np.array([[rows[0], rows[1]], [rows[1], rows[2]], [rows[3], rows[4]],
                         [rows[5], rows[6]], [rows[7], rows[8]]])
    for seed in range(5):
        res = split_collection(col, seed=seed, together=together)
        for a, b in together:
            assert res.split[a] == res.split[b]
            # whole groups move together: every image of both cases is in that split
            both = np.isin(groups, [groups[a], groups[b]])
            assert set(res.split[both]) == {res.split[a]}
        for g in set(groups):
            assert len(set(res.split[groups == g])) == 1


def test_split_command_keeps_a_planted_near_duplicate_in_one_split(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from medsig.cli import app
    from medsig.data.synth import synthesize

    spec = synthesize("derm", tmp_path / "d", n=120, seed=0, image_size=48)
    col = load_collection(spec)
    groups = col.groups.astype(str)
    src = 0
    dst = int(np.nonzero(groups != groups[src])[0][0])
    Image.open(col.image_paths[src]).convert("RGB").resize((40, 40)).save(
        col.image_paths[dst], "JPEG", quality=85)
    out = CliRunner().invoke(app, ["data", "split", str(spec), "--seed", "1"],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "1 near-duplicate image pair(s) in different groups" in out.output
    pairs = pd.read_csv(spec.parent / "near_duplicates.csv")
    assert pairs[["id", "duplicate_id"]].values.tolist() == [[str(col.ids[src]),
                                                              str(col.ids[dst])]]
    splits = pd.read_csv(spec.parent / "splits.csv").set_index("id")["split"]
    assert splits[str(col.ids[src])] == splits[str(col.ids[dst])]
    # --duplicates 0: no check, and no stale list from the run before
    out = CliRunner().invoke(app, ["data", "split", str(spec), "--duplicates", "0", "--force"])
    assert out.exit_code == 0, out.output
    assert not (spec.parent / "near_duplicates.csv").exists()
