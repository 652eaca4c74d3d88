"""Sharded embedding: 2 processes (gloo, the `--processes` launcher) against one.

One launch runs a partial 2-process embed (the first rows, as if stopped) and then the full
one, which must resume: every row embedded once, by one process, skips counted once, and
the collection equal to a single-process run (ids, vectors within 1e-6, payloads).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medsig.index.runner import embed_collection
from medsig.index.sharded import launch, shard
from medsig.index.store import VectorStore, close_store

ROOT = Path(__file__).resolve().parents[1]
N, FIRST, BROKEN = 30, 13, 27


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medsig.data.collection import load_collection
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    root = tmp_path_factory.mktemp("embed-dist")
    spec = synthesize("wound", root / "wound", n=N, seed=0, image_size=40)
    load_collection(spec).image_paths[BROKEN].write_bytes(b"not a PNG")  # in rank 1's share
    return spec, write_tiny(root / "tiny", arch="siglip", image_size=32)


def _points(store: Path) -> dict[str, tuple[dict, dict]]:
    vs = VectorStore(store, "wounds")
    points = {p.id: (p.vector, p.payload) for batch in vs.scroll() for p in batch}
    close_store(store)
    return points


def test_shard_is_contiguous_and_complete():
    rows = list(range(7))
    parts = [shard(rows, k, 3) for k in range(3)]
    assert parts == [[0, 1], [2, 3], [4, 5, 6]]
    assert shard(rows, 0, 1) == rows and shard([], 1, 2) == []


def test_two_processes_give_the_single_process_collection(data, tmp_path, monkeypatch):
    spec, model = data
    single = embed_collection(spec, model, tmp_path / "one", "wounds", batch_size=4,
                              num_workers=0, progress=False)
    close_store(tmp_path / "one")
    store = tmp_path / "two" / "qdrant"
    store.parent.mkdir()
    jobs = [{"spec": str(spec), "model": str(model), "store": str(store), "limit": limit}
            for limit in (FIRST, None)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'src'}:{ROOT}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch([sys.executable, "-m", "tests.embed_worker", str(tmp_path / "jobs.json")],
                  2) == 0
    out = store.parent
    partial, full = (json.loads((out / f"report-{k}.json").read_text()) for k in (0, 1))
    assert partial["embedded"] == FIRST and partial["processes"] == 2
    assert partial["points_after"] == FIRST
    # the re-run skips what is there and embeds the rest, split between the processes; the
    # unreadable image (rank 1's) is counted once, in rank 0's report, with its reason
    assert full["already_indexed"] == FIRST and full["embedded"] == N - FIRST - 1
    assert full["skipped"] == dict(single.skipped) and sum(single.skipped.values()) == 1
    assert full["points_after"] == N - 1 and single.points_after == N - 1
    for k, todo in [(0, list(range(FIRST))), (1, list(range(FIRST, N)))]:
        rows = [json.loads((out / f"rows-{k}-{r}.json").read_text()) for r in (0, 1)]
        assert rows == [shard(todo, 0, 2), shard(todo, 1, 2)]
    one, two = _points(tmp_path / "one"), _points(store)
    assert set(one) == set(two) and len(two) == N - 1
    for pid, (vectors, payload) in one.items():
        assert two[pid][1] == payload
        assert set(two[pid][0]) == set(vectors) == {"image", "text"}
        for name, v in vectors.items():
            assert np.abs(np.asarray(v) - np.asarray(two[pid][0][name])).max() <= 1e-6


def test_launch_stops_the_others_when_one_fails(capfd):
    code = ("import os, sys, time\n"
            "if os.environ['RANK'] == '1': sys.exit(3)\n"
            "time.sleep(60)\n")
    assert launch([sys.executable, "-c", code], 2) == 3  # at once, not after 60 s
    killed = code.replace("sys.exit(3)", "os.kill(os.getpid(), 9)")
    assert launch([sys.executable, "-c", killed], 2) == 137
    assert "process 1 of 2 was killed by signal 9" in capfd.readouterr().err
