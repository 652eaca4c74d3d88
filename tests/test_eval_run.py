"""End-to-end evaluation: generated derm data, two tiny SigLIPs with probes (+ one plain)."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medsig.errors import ConfigError
from medsig.evaluate.run import TASKS, evaluate, fingerprint

_ENV: dict[str, SimpleNamespace] = {}


def eval_env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Data, models and one evaluation run, built once per session (shared with the web test)."""
    if "env" in _ENV:
        return _ENV["env"]
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    root = tmp_path_factory.mktemp("eval")
    spec = synthesize("derm", root / "data", n=240, seed=0, image_size=32)
    col = load_collection(spec)
    splits, _ = write_split(col, split_collection(col, seed=0), spec.parent)
    set_spec_splits(spec, splits.name)
    tiny = [write_tiny(root / f"tiny{s}", image_size=32, seed=s) for s in (0, 1)]
    probes = [train_probe(spec, t, root / f"probe{s}", labels=["urgent", "category"],
                          probe={"C": [1.0]}) for s, t in enumerate(tiny)]
    models = {"probe0": str(probes[0]), "probe1": str(probes[1]), "plain1": str(tiny[1])}
    out = root / "eval"
    start = time.perf_counter()
    metrics = evaluate(spec, models, out=out, n_boot=100, subgroups=["fitzpatrick"],
                       num_workers=0)
    _ENV["env"] = SimpleNamespace(root=root, spec=spec, models=models, out=out,
                                  metrics=metrics, seconds=time.perf_counter() - start)
    return _ENV["env"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return eval_env(tmp_path_factory)


def test_every_task_for_both_trained_models(env) -> None:
    m = json.loads((env.out / "metrics.json").read_text())
    assert m["model_order"] == ["probe0", "probe1", "plain1"]
    for task in TASKS:
        for name in ("probe0", "probe1"):
            assert "skipped" not in m[task][name], (task, name, m[task][name])
    assert "skipped" in m["classification"]["plain1"]  # no heads: honest skip
    labels = m["classification"]["probe0"]["labels"]
    assert labels["urgent"]["calibration"]["ece"] is not None
    assert set(labels["urgent"]["at_0.5"]) >= {"sensitivity", "specificity"}
    assert labels["category"]["kind"] == "multilabel"
    assert set(m["zeroshot"]["probe0"]["labels"]) == {"condition", "category", "urgent"}
    r = m["retrieval"]["probe1"]
    assert {"global_text", "global_class", "batchwise_text", "batchwise_class",
            "distractor"} <= set(r)
    assert r["batchwise_text"]["batch_size"] == 32
    assert m["clustering"]["probe0"]["labels"]["category"]["nmi"] is not None
    assert m["leakage"]["n_leaked_groups"] == 0
    dup = m["leakage"]["near_duplicates"]
    assert dup["n_images"] == 240 and sum(dup["counts"].values()) == 0
    assert m["n_rows"] == len(pd.read_csv(env.spec.parent / "splits.csv").query("split == "
                                                                                 "'test'"))


def test_cis_contain_points_and_paired_verdicts(env) -> None:
    m = env.metrics
    expected = {"classification/macro_auc", "zeroshot/accuracy", "zeroshot/macro_auc",
                "retrieval/image_to_text_recall@1", "retrieval/image_to_text_recall@5",
                "retrieval/image_to_text_recall@10", "clustering/nmi:category"}
    assert expected <= set(m["headline"])
    for metric, per in m["headline"].items():
        for name, ci in per.items():
            assert ci["unit"] == "groups" and ci["n_units"] == m["n_groups"]
            if ci["point"] is not None and ci["low"] is not None:
                assert ci["low"] - 1e-9 <= ci["point"] <= ci["high"] + 1e-9, (metric, name, ci)
        assert m["winners"][metric]["model"] in per
        for name in per:
            if name != "probe0" and "probe0" in per:
                verdict = m["paired"][metric][name]["verdict"]
                p = m["paired"][metric][name]
                crosses = p["low"] is None or p["low"] <= 0 <= p["high"]
                assert verdict.startswith("not significant") == crosses, (metric, p)
    # headline = the per-label metrics (mean over labels of the macro AUCs)
    lab = m["classification"]["probe1"]["labels"]
    macro = np.mean([lab["urgent"]["roc_auc"], lab["category"]["macro"]["roc_auc"]])
    assert m["headline"]["classification/macro_auc"]["probe1"]["point"] == pytest.approx(macro)
    nmi = m["clustering"]["probe0"]["labels"]["category"]["nmi"]
    assert m["headline"]["clustering/nmi:category"]["probe0"]["point"] == pytest.approx(nmi)
    # the same encoder gives the same zero-shot / retrieval numbers
    for metric in ("zeroshot/accuracy", "retrieval/image_to_text_recall@10"):
        assert m["headline"][metric]["probe1"]["point"] == m["headline"][metric]["plain1"]["point"]
    fitz = m["subgroups"]["fitzpatrick"]
    assert sum(fitz["counts"].values()) == m["n_rows"]
    assert set(fitz["metrics"]["zeroshot/accuracy"]["I"]) == {"probe0", "probe1", "plain1"}


def test_second_run_reuses_the_cache(env, monkeypatch) -> None:
    import medsig.evaluate.run as run

    def boom(*args, **kwargs):
        raise AssertionError("embedded again despite a valid cache")

    monkeypatch.setattr(run, "compute_outputs", boom)
    again = evaluate(env.spec, env.models, out=env.out, n_boot=100, subgroups=["fitzpatrick"],
                     num_workers=0, report=False)
    assert {v["cache"] for v in again["models"].values()} == {"hit"}
    for metric, per in env.metrics["headline"].items():
        for name, ci in per.items():
            assert again["headline"][metric][name]["point"] == ci["point"]


def test_fingerprint_depends_on_rows(env) -> None:
    from medsig.data.collection import load_collection

    col = load_collection(env.spec)
    path = env.models["plain1"]
    assert fingerprint(path, col) == fingerprint(path, col)
    assert fingerprint(path, col) != fingerprint(path, col.subset(np.arange(10)))


def test_batched_zeroshot_matches_the_contract(env) -> None:
    from medsig.data.collection import load_collection
    from medsig.evaluate.run import zeroshot_all
    from medsig.models.encoder import Encoder
    from medsig.models.zeroshot import zeroshot_probabilities

    col = load_collection(env.spec).subset(np.arange(12))
    encoder = Encoder.load(env.models["plain1"])
    image = encoder.embed_images(torch_pixels(col, encoder)).numpy()
    probs, _ = zeroshot_all(encoder, col, image)
    assert set(probs) == set(col.labels)
    for label in ("urgent", "category"):  # the 53-class label is covered by the same code
        ref = zeroshot_probabilities(encoder, col, label, image_emb=image)
        np.testing.assert_allclose(probs[label], ref, atol=1e-5)


def torch_pixels(col, encoder):
    import torch

    from medsig.data.images import load_image

    return torch.stack([encoder.preprocess(load_image(p)) for p in col.image_paths])


def test_report_files(env) -> None:
    md = (env.out / "report.md").read_text()
    page = (env.out / "report.html").read_text()
    assert "How to read this report" in md
    assert "diagnostic claim" in md and "group bootstrap" in md
    assert "![" in md and all((env.out / p).is_file() for p in re.findall(r"\]\(([^#].*?)\)", md))
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert page.count("data:image/png;base64,") >= 5
    for name in ("probe0", "probe1", "Paired differences", "Subgroups by fitzpatrick"):
        assert name in page


def test_planted_leak_fails_loudly(env, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(env.spec.parent, data)
    splits = pd.read_csv(data / "splits.csv")
    sizes = splits.groupby("group").size()
    group = sizes[sizes >= 2].index[0]
    rows = splits.index[splits["group"] == group]
    other = "test" if splits.loc[rows[0], "split"] != "test" else "train"
    splits.loc[rows[0], "split"] = other
    splits.to_csv(data / "splits.csv", index=False)
    with pytest.raises(ConfigError, match=re.escape(f"'{group}'")) as info:
        evaluate(data / "spec.yaml", {"a": env.models["plain1"]}, out=tmp_path / "out")
    assert "leakage" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_planted_near_duplicate_is_reported(env, tmp_path: Path) -> None:
    """A train image re-saved (smaller, recompressed) as a test image of another case:
    the group check cannot see it; the near-duplicate check names it."""
    from PIL import Image

    from medsig.data.collection import load_collection
    from medsig.evaluate.cli import duplicate_warning

    data = tmp_path / "data"
    shutil.copytree(env.spec.parent, data)
    col = load_collection(data / "spec.yaml")
    split = np.asarray(col.split)
    src, dst = np.nonzero(split == "train")[0][0], np.nonzero(split == "test")[0][0]
    assert col.groups[src] != col.groups[dst]
    image = Image.open(col.image_paths[src]).convert("RGB")
    image.resize((image.width * 3 // 4, image.height * 3 // 4)).save(
        col.image_paths[dst], "JPEG", quality=80)
    m = evaluate(data / "spec.yaml", {"a": env.models["plain1"]}, out=tmp_path / "out",
                 tasks=("clustering",), n_boot=10, num_workers=0)
    dup = m["leakage"]["near_duplicates"]
    assert dup["counts"]["train/test"] == 1 and dup["other_group"]["train/test"] == 1
    assert dup["examples"] == [{"id": str(col.ids[dst]), "split": "test",
                                "duplicate_of": str(col.ids[src]),
                                "split_of_duplicate": "train", "cosine": pytest.approx(1, abs=0.01),
                                "same_group": False}]
    assert "train/test: 1" in duplicate_warning(m)
    md = (tmp_path / "out" / "report.md").read_text()
    assert str(col.ids[dst]) in md and "escaped the group check" in md
    # skipped on request
    m = evaluate(data / "spec.yaml", {"a": env.models["plain1"]}, tasks=("clustering",),
                 n_boot=10, num_workers=0, duplicates=None)
    assert "near_duplicates" not in m["leakage"] and duplicate_warning(m) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ("retrieval", "segmentation")}, "unknown task"),
    ({"subgroups": ["no_such_column"]}, "unknown subgroup column 'no_such_column'"),
    ({"split": "holdout"}, "split 'holdout' has no rows"),
])
def test_config_errors(env, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate(env.spec, {"a": env.models["plain1"]}, n_boot=10, **kwargs)


def test_cli_parsing_and_summary(env) -> None:
    from medsig.evaluate.cli import parse_models, parse_tasks, summary_table

    assert parse_models(["a=x", "b = y/z"]) == {"a": "x", "b": "y/z"}
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"], []):
        with pytest.raises(ConfigError):
            parse_models(bad)
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("zeroshot, retrieval") == ["zeroshot", "retrieval"]
    with pytest.raises(ConfigError, match="unknown task"):
        parse_tasks("zeroshot,nope")
    table = summary_table(env.metrics)
    assert table.row_count == len(env.metrics["headline"])
    assert math.isfinite(env.seconds)


def test_cli_command_runs_on_the_cache(env) -> None:
    import typer
    from typer.testing import CliRunner

    from medsig.evaluate.cli import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    # the form: --models a=M1 b=M2 (the second value lands as a positional)
    args = [str(env.spec), "--models", f"probe0={env.models['probe0']}",
            f"plain1={env.models['plain1']}", "--out", str(env.out), "--n-boot", "20",
            "--tasks", "zeroshot,retrieval", "--subgroup", "sex"]
    result = CliRunner().invoke(app, args, terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "0-shot acc" in result.output and "report:" in result.output
    assert "plain1" in result.output
    bad = CliRunner().invoke(app, [str(env.spec), "-m", "oops", "--out", str(env.out)])
    assert isinstance(bad.exception, ConfigError) and "name=path" in str(bad.exception)
