"""The evaluation report's hooks: test-set ledger, hidden-subgroup audit, retention / alphas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import yaml

from medsig.evaluate.ledger import LEDGER, ledger_path, record_use, rows_fingerprint
from tests.test_eval_run import eval_env


def test_report_has_the_audit_and_the_ledger(tmp_path_factory):
    env = eval_env(tmp_path_factory)
    audit = env.metrics["audit"]["models"]["probe0"]
    assert audit["metric"] == "classification/macro_auc"
    clusters = audit["clusters"]["subgroups"]
    assert sum(c["n"] for c in clusters.values()) == env.metrics["n_rows"]
    assert "fitzpatrick" in audit["columns"]
    assert "plain1" in env.metrics["audit"]["models"]  # zero-shot metric for a plain model
    led = env.metrics["ledger"]
    assert led["uses"] >= 1 and led["n_rows"] == env.metrics["n_rows_in_split"]
    assert (env.spec.parent / LEDGER).is_file()
    md = (env.out / "report.md").read_text()
    assert "Test-set ledger" in md and "Hidden subgroups" in md


def test_ledger_counts_uses_and_warns(tmp_path):
    spec = SimpleNamespace(name="derm", splits="splits.csv", splits_path=tmp_path / "splits.csv",
                           table_path=tmp_path / "t.csv")
    ids, groups = ["a", "b", "c"], ["g1", "g1", "g2"]
    first = record_use(spec, ids, groups, {"m": "x"})
    assert first["uses"] == 1 and first["warnings"] == []
    second = record_use(spec, list(reversed(ids)), list(reversed(groups)), {"m": "x"})
    assert second["uses"] == 2 and "evaluated 2 times" in second["warnings"][0]
    chosen = record_use(spec, ids, groups, {"m": "x"}, purpose="select")
    assert chosen["selections"] == 1 and "chosen on this test set" in chosen["warnings"][0]
    other = record_use(spec, ids[:2], groups[:2], {"m": "x"})  # a re-split: a new count
    assert other["uses"] == 1
    data = json.loads(ledger_path(spec).read_text())
    assert set(data["collections"]["derm"]) == {rows_fingerprint(ids, groups),
                                                rows_fingerprint(ids[:2], groups[:2])}


def test_alpha_selection_on_val_with_the_specs_retention_check(tmp_path_factory):
    from medsig.evaluate.blending import choose_alpha
    from medsig.evaluate.run import evaluate

    env = eval_env(tmp_path_factory)
    raw = yaml.safe_load(env.spec.read_text())
    raw["retention"] = {"metric": "clustering/nmi:category"}
    spec = env.spec.parent / "spec_retention.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    base, tuned = env.root / "tiny0", env.root / "tiny1"
    res = choose_alpha(spec, str(base), str(tuned), [0.5], tmp_path_factory.mktemp("blend"),
                       "zeroshot/macro_auc", "val", n_boot=20, num_workers=0)
    assert [r["alpha"] for r in res["rows"]] == [0.0, 0.5, 1.0]
    assert res["retention"]["split"] == "val" and res["retention"]["metric"] == \
        "clustering/nmi:category"
    assert all(r["retention"]["point"] is not None for r in res["rows"])
    mid = res["rows"][1]  # ratios with intervals over the same resamples, no raw resamples
    assert "replicates" not in mid["retention"] and mid["retained_ci"] is not None
    assert "alpha" in res["choice"]
    out = tmp_path_factory.mktemp("eval_ret")
    metrics = evaluate(spec, {"a": str(base), "b": str(tuned)}, tasks=["zeroshot"],
                       split="val", out=out, n_boot=20, num_workers=0, duplicates=None,
                       audit=False)
    assert set(metrics["retention"]["models"]) == {"a", "b"}
    assert "Retention: clustering/nmi:category" in (out / "report.md").read_text()
