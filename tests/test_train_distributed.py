"""Data-parallel training: 2 CPU processes (gloo, `accelerate launch --multi_gpu`) against one.

One launch trains every case (the processes' start-up dominates); each case is compared
with the same config trained in this process: the rows each process was given, the final
weights (within 1e-5) and the validation metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from medsig.train import train
from tests import dist_worker
from tests.test_train_helpers import (  # noqa: F401 (fixtures)
    assert_same_weights,
    config,
    tiny_fixture,
    wound_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"eval": {"at_start": False}, "optim": {"max_steps": 2, "batch_size": 8, "lr": 1e-3,
                                                  "warmup_ratio": 0.0}}


def step_case(wound: Path, tiny: Path, out: Path, name: str, **sections: Any
              ) -> dict[str, Any]:
    """A training config of a few steps (``STEPS``) with ``sections`` merged in."""
    merged = {**STEPS, **sections, "optim": {**STEPS["optim"], **sections.get("optim", {})}}
    return config(wound, tiny, out / name, **merged)


def _cases(wound: Path, tiny: Path, out: Path) -> dict[str, dict[str, Any]]:
    def case(name: str, **sections: Any) -> dict[str, Any]:
        return step_case(wound, tiny, out, name, **sections)

    return {
        # 3 steps, a checkpoint after each: the resumed run below must end on these weights
        "sigmoid": case("sigmoid", optim={"max_steps": 3}, eval={"at_start": False,
                                                                 "save_every_steps": 1}),
        "mp_sigmoid": case("mp_sigmoid", contrastive={"loss": "multi_positive_sigmoid",
                                                      "positives": "same_class"}),
        "softmax": case("softmax", contrastive={"loss": "softmax", "positives": "any_shared"}),
        "gradcache": case("gradcache", optim={"batch_size": 4, "grad_accum": 2,
                                              "gradcache": True}),
        # 7 rows a micro-batch: slices of 4 and 3; 2 micro-batches per step (no_sync path)
        "classify": case("classify", objective="classify", optim={"batch_size": 7,
                                                                  "grad_accum": 2}),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(jobs: list[dict[str, Any]], tmp: Path,
            launcher: tuple[str, ...] = ("--multi_gpu",)) -> None:
    """Run the jobs in 2 processes (tests/dist_worker.py); ``launcher``: accelerate launch
    options (e.g. ``--config_file fsdp.yaml``)."""
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # on CPU, accelerate's `--cpu` launcher starts ONE process: `--multi_gpu` (torchrun
    # underneath) starts two, and the config's device: cpu gives them gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher,
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "tests.dist_worker", str(jobs_file)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _single(cfg: dict[str, Any]) -> list[list[list[int]]]:
    """Train in this process; the rows of each micro-batch of each step."""
    dist_worker.RECORDED.clear()
    train(cfg)
    return [list(step) for step in dist_worker.RECORDED]


@pytest.fixture(scope="module")
def runs(wound: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    two, one = _cases(wound, tiny, tmp / "two"), _cases(wound, tiny, tmp / "one")
    resume = {**two["sigmoid"], "out": str(tmp / "two" / "resumed")}
    jobs = [{"config": c, "stop_at": None} for c in two.values()]
    jobs.append({"config": resume, "stop_at": 2})
    _launch(jobs, tmp)
    from medsig.train.classify import ClassifyObjective
    from medsig.train.contrastive import ContrastiveObjective

    originals = ContrastiveObjective.step, ClassifyObjective.step
    dist_worker.record_rows(ContrastiveObjective)
    dist_worker.record_rows(ClassifyObjective)
    try:
        rows = {name: _single(cfg) for name, cfg in one.items()}
    finally:
        ContrastiveObjective.step, ClassifyObjective.step = originals
    return {"one": one, "two": two, "rows": rows, "resumed": Path(resume["out"])}


def _weights(out: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def _val(out: str | Path) -> dict[str, float]:
    return json.loads((Path(out) / "medsig.json").read_text())["metrics"]["val"]


CASES = ["sigmoid", "mp_sigmoid", "softmax", "gradcache", "classify"]


@pytest.mark.parametrize("name", CASES)
def test_each_process_trains_on_its_half_of_the_global_batch(runs: dict[str, Any],
                                                             name: str) -> None:
    out = Path(runs["two"][name]["out"])
    ranks = [json.loads((out / f"rows-{r}.json").read_text()) for r in (0, 1)]
    single = runs["rows"][name]
    assert len(ranks[0]) == len(ranks[1]) == len(single) > 0
    for step, (a, b, whole) in enumerate(zip(*ranks, single)):
        assert len(a) == len(b) == len(whole), step
        for m_a, m_b, m in zip(a, b, whole):
            assert m_a + m_b == m, (step, m_a, m_b, m)  # contiguous halves, rank order
            assert abs(len(m_a) - len(m_b)) <= 1 and not set(m_a) & set(m_b)


def assert_same_run(one: str | Path, two: str | Path) -> dict[str, Any]:
    """Weights within 1e-5 and equal val metrics of two runs; the second's medsig.json."""
    assert_same_weights(_weights(one), _weights(two), atol=1e-5)
    val_one, val_two = _val(one), _val(two)
    assert val_one.keys() == val_two.keys()
    for k, v in val_one.items():
        assert val_two[k] == pytest.approx(v, abs=1e-5, nan_ok=True), k
    return json.loads((Path(two) / "medsig.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_two_processes_end_with_the_weights_and_metrics_of_one(runs: dict[str, Any],
                                                               name: str) -> None:
    one, two = runs["one"][name]["out"], runs["two"][name]["out"]
    info = assert_same_run(one, two)
    assert info["training"]["steps"] == runs["one"][name]["optim"]["max_steps"]
    assert not (Path(two) / "checkpoints" / "last.tmp").exists()


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs: dict[str, Any]) -> None:
    resumed, full = runs["resumed"], Path(runs["two"]["sigmoid"]["out"])
    state = json.loads((resumed / "checkpoints/last/state.json").read_text())
    assert state["step"] == 3
    a, b = _weights(full), _weights(resumed)
    for k in a:  # the same processes, the same order of sums: bit for bit
        assert torch.equal(a[k], b[k]), k
    assert _val(full) == _val(resumed)
