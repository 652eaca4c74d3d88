"""Safe outputs in the evaluation: calibration before / after, conformal coverage and the
OOD gate, computed from the saved data and shown in the report."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_eval_run import eval_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return eval_env(tmp_path_factory)


def test_metrics_hold_calibration_coverage_and_ood(env) -> None:
    import torch

    from medsig.data.collection import load_collection
    from medsig.metrics.classification import calibration
    from medsig.models.predictor import load_predictor

    safe = env.metrics["safe_outputs"]
    assert safe["plain1"] is None  # no heads, no safe outputs
    r = safe["probe0"]
    assert set(r["labels"]) == {"urgent", "category"}
    for e in r["labels"].values():
        assert e["before"]["n"] == e["after"]["n"] > 0
        c = e["conformal"]
        assert c["target"] == pytest.approx(0.9) and 0 <= c["abstention"] <= 1
        assert 0 <= c["coverage"] <= 1 and c["mean_set_size"] >= 0
    # the "before" numbers are the raw model's: recompute from raw probabilities
    predictor = load_predictor(env.models["probe0"])
    col = load_collection(env.spec).select_split("test")
    emb = np.load(env.out / "cache" / "probe0.npz")["image"]
    with torch.inference_mode():  # the probe before its temperatures
        p_raw = predictor._from_embeddings(torch.as_tensor(emb)).numpy()
    h = next(h for h in predictor.heads if h.name == "urgent")
    before = calibration(col.labels["urgent"].targets, p_raw[:, h.offset])
    assert r["labels"]["urgent"]["before"]["ece"] == pytest.approx(before["ece"], abs=1e-4)
    o = r["ood"]
    assert 0 <= o["false_reject"] <= 1 and o["n"] == len(col)
    assert set(o["outliers"]) == {"noise", "blank", "near_blank", "text"}
    assert all(0 <= v["auroc"] <= 1 for v in o["outliers"].values())


def test_report_shows_safe_outputs(env) -> None:
    md = (env.out / "report.md").read_text()
    assert "## Safe outputs: calibration, abstention, refusal" in md
    assert "ECE before → after" in md and "coverage" in md and "false-reject on split" in md
    assert "calibration-probe0-urgent" in md  # the before / after reliability diagram
