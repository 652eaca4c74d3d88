"""bench/gpu.py --smoke: the GPU benchmark's code runs end to end on CPU with tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_bench_smoke_runs_and_writes_its_table(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # its pool pickles by module name
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    module.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    (shape,) = res["shapes"]
    assert shape["shape"] == "tiny" and shape["images"] == 48
    assert shape["medsig"]["embedded"] == 48 and shape["medsig"]["train"]["steps_timed"] >= 1
    for key in ("embed", "eval_pass", "train"):
        assert shape["ratios"][key] > 0
    assert shape["fidelity"]["image_cos_min"] > 0.999  # fp32 against itself on CPU
    printed = capsys.readouterr().out
    assert "contrastive train step" in printed and "ratio" in printed
