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


def _report(env, tmp_path):
    """The report of the session's metrics, written afresh (other tests rewrite env.out)."""
    from medsig.evaluate.report import write_report

    md, page = write_report(env.metrics, tmp_path / "report")
    return md.read_text(), page.read_text()


def test_report_shows_safe_outputs(env, tmp_path) -> None:
    md, _ = _report(env, tmp_path)
    assert "## Safe outputs: calibration, abstention, refusal" in md
    assert "ECE before → after" in md and "coverage" in md and "false-reject on split" in md
    assert "calibration-probe0-urgent" in md  # the before / after reliability diagram


def test_clinician_table_and_contents(env, tmp_path) -> None:
    from medsig.data.collection import load_collection
    from medsig.metrics.classification import binary_metrics

    rows = env.metrics["clinical"]["probe0"]
    e = rows["Urgent"]
    col = load_collection(env.spec).select_split("test")
    y = col.labels["urgent"].targets
    probs = np.load(env.out / "cache" / "probe0.npz")["probs"]
    from medsig.models.predictor import load_predictor

    h = next(h for h in load_predictor(env.models["probe0"]).heads if h.name == "urgent")
    want = binary_metrics(y, probs[:, h.offset], h.thresholds[0])
    assert e["threshold"] == pytest.approx(h.thresholds[0])
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        v = e[key]
        assert v["value"] == pytest.approx(want[key], nan_ok=True)
        if np.isfinite(v["value"]):
            assert v["low"] <= v["value"] <= v["high"]
    assert e["prevalence"]["value"] == pytest.approx(want["n_pos"] / want["n"])
    md, page = _report(env, tmp_path)
    assert "## Contents" in md and "- [For clinicians: decisions at the saved thresholds]" \
        "(#for-clinicians-decisions-at-the-saved-thresholds)" in md
    assert "| Urgent |" in md and "PPV" in md and "NPV" in md
    assert "id='for-clinicians-decisions-at-the-saved-thresholds'" in page
