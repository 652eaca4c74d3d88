"""Metrics that cannot flatter: retrieval ties, NMI intervals, small subgroups."""

from __future__ import annotations

import numpy as np
import pytest

from medsig.metrics.retrieval import batchwise_recall, retrieval_metrics, retrieval_ranks


@pytest.mark.parametrize("positives", [None, "groups", "pairs"])
def test_collapsed_tower_gets_chance_recall(positives):
    rng = np.random.default_rng(0)
    n, d = 200, 16
    text = rng.normal(size=(n, d)).astype(np.float32)
    image = np.tile(rng.normal(size=(1, d)).astype(np.float32), (n, 1))  # all one vector
    image += 1e-9 * rng.normal(size=(n, d)).astype(np.float32)  # float noise stays a tie
    if positives == "groups":
        positives = np.repeat(np.arange(n // 4), 4)  # 4 items per class: chance 4 / 200
    elif positives == "pairs":  # training's validation: (image -> text id, distinct texts)
        positives = (np.arange(n), np.arange(n))
    m = retrieval_metrics(image, text, positives, ks=(1, 5))
    chance = 4 / n if isinstance(positives, np.ndarray) else 1 / n
    assert m["text_to_image"]["recall@1"] <= chance
    assert m["text_to_image"]["recall@5"] <= 5 * chance
    b = batchwise_recall(image, text, batch_size=32, ks=(1,), positives=positives
                         if isinstance(positives, np.ndarray) else None)
    assert b["text_to_image"]["recall@1"] <= 4 / 32 + 1e-9


def test_exact_ties_count_against_the_query():
    # query 0's positive ties one non-positive, query 1's positive is strictly best
    image = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ri, _ = retrieval_ranks(image, text, (np.array([0, 2]), np.array([0, 1, 2])))
    assert ri.tolist() == [2, 1]


def test_bias_corrected_nmi_interval_stays_in_range():
    from medsig.evaluate.run import _ci
    from medsig.evaluate.tasks import _nmi

    rng = np.random.default_rng(1)
    y, c = rng.integers(0, 3, 40), rng.integers(0, 4, 40)  # unrelated: NMI near 0
    res = _ci(_nmi, (y, c), np.arange(40), n_boot=200, seed=0, bias_correct=True)
    assert res["bias"] > 0 and res["low_uncorrected"] - res["bias"] < 0  # would go below 0
    assert 0.0 <= res["low"] <= res["high"] <= 1.0


def test_subgroups_show_n_flag_small_and_name_missing(tmp_path):
    from medsig.data.collection import load_collection
    from medsig.evaluate.report import render_markdown, subgroup_section
    from medsig.evaluate.run import subgroup_tables
    from medsig.evaluate.tasks import Headlines
    from tests.conftest import write_wound_spec

    col = load_collection(write_wound_spec(tmp_path))
    hl = Headlines()
    hl.add("m", "model", lambda x: float(np.mean(x)), (np.arange(len(col), dtype=float),))
    tables = subgroup_tables(col, ["erythema"], hl)
    assert set(tables["erythema"]["counts"]) == {"Absent", "Present", "not recorded"}
    md = render_markdown(subgroup_section({"subgroups": tables, "model_order": ["model"]}))
    assert "MISSING" not in md and "not recorded ⚠ small" in md
    assert "| m | Absent ⚠ small | 2 (2) |" in md  # n images (groups) beside the metric
