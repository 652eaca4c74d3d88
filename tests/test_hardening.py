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
    from medsig.evaluate.statistics import _ci
    from medsig.evaluate.tasks import _nmi

    rng = np.random.default_rng(1)
    y, c = rng.integers(0, 3, 40), rng.integers(0, 4, 40)  # unrelated: NMI near 0
    res = _ci(_nmi, (y, c), np.arange(40), n_boot=100, seed=0, bias_correct=True)
    assert res["bias"] > 0 and res["low_uncorrected"] - res["bias"] < 0  # would go below 0
    assert 0.0 <= res["low"] <= res["high"] <= 1.0


def test_subgroups_show_n_flag_small_and_name_missing(tmp_path):
    from medsig.data.collection import load_collection
    from medsig.evaluate.report import render_markdown, subgroup_section
    from medsig.evaluate.statistics import subgroup_tables
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


def test_progress_in_a_log_is_a_few_whole_lines(monkeypatch, capsys):
    import medsig.progress as P
    from medsig.index.runner import _progress

    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    bar = _progress(2000, True)  # what `medsig embed ... > log 2>&1` gets
    assert isinstance(bar, P.LineProgress)
    for _ in range(2000):  # 2,000 images over 200 s
        clock[0] += 0.1
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 5 <= len(lines) <= 12, lines
    assert lines[-1].startswith("embed: 2000/2000 img (100%) done in 200.0 s")


def test_progress_on_a_terminal_is_a_live_bar_and_can_be_off(monkeypatch):
    import io

    from tqdm.auto import tqdm

    import medsig.progress as P

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(P.progress_bar(10, "x", stream=Tty()), tqdm)
    monkeypatch.setenv("MEDSIG_PROGRESS", "off")
    quiet = io.StringIO()
    bar = P.progress_bar(10, "x", stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""


def test_piped_tables_are_full_width(capsys):
    from rich.table import Table

    from medsig.progress import make_console, print_table

    console = make_console()
    table = Table("metric", *[f"model_{i}" for i in range(8)])
    table.add_row("text→image recall@1", *["0.364 [0.361–0.412]"] * 8)
    print_table(console, table)
    path = "/very/long/" + "folder/" * 40 + "report.html"
    console.print(f"report: {path}")
    out = capsys.readouterr().out
    assert out.count("0.364 [0.361–0.412]") == 8 and "…" not in out
    assert f"report: {path}\n" in out  # one line, never split


def test_hugging_face_bars_are_off_in_a_log():
    import os
    import subprocess
    import sys

    code = ("import medsig\nfrom transformers.utils import logging\n"
            "print(logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-500:]
