"""The embedded engine (Qdrant Edge): export/import, legacy stores, crash safety, clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsig.errors import ConfigError, DataError
from medsig.index.runner import embed_collection
from medsig.index.search import parse_where
from medsig.index.store import VectorStore, close_store, point_id
from medsig.index.transfer import export_collection, import_collection
from tests.conftest import WOUND_CSV, write_wound_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path) -> Path:
    spec = write_wound_spec(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        arr = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"a{i}.png")
    return spec


def _points(store, name) -> dict[str, tuple[dict, dict]]:
    vs = VectorStore(store, name, legacy=True)
    return {p.id: (p.vector, p.payload) for batch in vs.scroll(2) for p in batch}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for pid, (vec, payload) in a.items():
        other_vec, other_payload = b[pid]
        assert payload == other_payload
        assert vec.keys() == other_vec.keys()
        for k in vec:
            assert np.allclose(vec[k], other_vec[k], atol=1e-6)


@pytest.mark.parametrize("suffix", [".zip", ".jsonl"])
def test_export_import_round_trip(tmp_path, encoder, suffix):
    spec = _spec(tmp_path)
    embed_collection(spec, encoder, tmp_path / "a", "w", num_workers=0, progress=False)
    report = export_collection(tmp_path / "a", "w", tmp_path / f"w{suffix}")
    assert report.points == 5
    imported = import_collection(tmp_path / f"w{suffix}", tmp_path / "b", "copy")
    assert imported.points == 5
    _same(_points(tmp_path / "a", "w"), _points(tmp_path / "b", "copy"))
    target = VectorStore(tmp_path / "b", "copy")
    assert target.metadata()["model"] == encoder.name
    assert "labels.urgency" in target.backend.info()["payload_indexes"]
    # importing again (e.g. after an interrupted import) changes nothing
    assert import_collection(tmp_path / f"w{suffix}", tmp_path / "b", "copy").points == 5
    assert target.count() == 5
    close_store()


def test_legacy_local_store_is_refused_then_migrated(tmp_path, encoder):
    """A store written by qdrant-client local mode (medsig before Edge) moves over intact."""
    from qdrant_client import QdrantClient

    from medsig.index.server import ServerCollection

    legacy = ServerCollection(QdrantClient(path=str(tmp_path / "old")), "w")
    legacy.create({"image": 4, "text": 4}, {"model": "m"}, {"split": "keyword"})
    rng = np.random.default_rng(0)
    vec = {k: rng.normal(size=(3, 4)).astype(np.float32) for k in ("image", "text")}
    ids = [point_id(f"r{i}") for i in range(3)]
    legacy.upsert(ids, vec, [{"id": f"r{i}", "split": "test", "labels": {"u": "ok"}}
                             for i in range(3)])
    legacy.close()
    with pytest.raises(ConfigError, match="older medsig.*index export"):
        VectorStore(tmp_path / "old", "w")
    export_collection(tmp_path / "old", "w", tmp_path / "w.zip")
    close_store(tmp_path / "old")
    import_collection(tmp_path / "w.zip", tmp_path / "new")
    new = VectorStore(tmp_path / "new", "w")
    assert new.engine == "qdrant-edge" and new.count() == 3
    got = new.get(ids[1])
    norm = vec["image"][1] / np.linalg.norm(vec["image"][1])  # cosine stores unit vectors
    assert np.allclose(got.vector["image"], norm, atol=1e-6)
    hits = new.search(vec["image"][1], "image", k=2, where=parse_where(["split=test"]))
    assert hits[0].id == ids[1] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert set(new.backend.info()["payload_indexes"]) >= {"split", "labels.u", "targets.u"}
    close_store()


def test_bad_export_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    manifest = {"format": "medsig-index", "version": 1, "collection": "c",
                "vectors": {"image": 2}, "count": 2}
    lines = [manifest, {"id": point_id("a"), "vectors": {"image": [1, 0]}, "payload": {}},
             {"id": "x", "vectors": {"image": [1, 0]}, "payload": {}}]
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=r"bad.jsonl: row 3: point id 'x' is not a UUID"):
        import_collection(bad, tmp_path / "s")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a medsig index export"):
        import_collection(tmp_path / "junk.zip", tmp_path / "s")
    # a zip whose vectors end early
    with zipfile.ZipFile(tmp_path / "short.zip", "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "medsig-index", "version": 1,
                                                 "collection": "c", "vectors": {"image": 2},
                                                 "count": 1}))
        zf.writestr("points.jsonl", json.dumps({"id": point_id("a"), "payload": {}}) + "\n")
        zf.writestr("vectors/image.f32", b"\x00\x00")
    with pytest.raises(DataError, match="ends before point 1"):
        import_collection(tmp_path / "short.zip", tmp_path / "s")
    close_store()


def test_second_process_gets_a_clear_error(tmp_path, encoder):
    spec = _spec(tmp_path)
    embed_collection(spec, encoder, tmp_path / "q", "w", num_workers=0, progress=False)
    code = ("from medsig.index.store import VectorStore\n"
            f"VectorStore({str(tmp_path / 'q')!r}, 'w').count()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode != 0 and "in use by another process" in out.stderr
    close_store(tmp_path / "q")


KILLER = """
import os, signal, sys
from medsig.index import runner, writer
from medsig.index.runner import embed_collection

class Killed(writer.StoreWriter):  # kill -9 right after the 2nd write reached the engine
    def __init__(self, store):
        super().__init__(store, flush_size=8)
        inner = store.upsert
        calls = []
        def upsert(*a):
            inner(*a)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        store.upsert = upsert

runner.StoreWriter = Killed
embed_collection(sys.argv[1], sys.argv[2], sys.argv[3], "w", batch_size=4, num_workers=0,
                 progress=False)
"""


def test_kill_9_during_embed_then_rerun_gives_exactly_n_points(tmp_path, encoder, tiny_model):
    spec = write_wound_spec(tmp_path)
    rng = np.random.default_rng(1)
    lines = [WOUND_CSV.splitlines()[0]]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"k{i}.png")
        lines.append(f"k{i},k{i}.png,p{i // 2},{'Red' if i % 3 else 'Green'},Absent,Low,[],")
    (tmp_path / "wounds.csv").write_text("\n".join(lines) + "\n")
    store = tmp_path / "q"
    out = subprocess.run([sys.executable, "-c", KILLER, str(spec), str(tiny_model), str(store)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == -9, out.stderr[-2000:]
    report = embed_collection(spec, encoder, store, "w", num_workers=0, progress=False)
    assert report.already_indexed >= 16 and report.already_indexed + report.embedded == 40
    vs = VectorStore(store, "w")
    assert report.points_after == vs.count() == 40
    ids = {p.id for batch in vs.scroll(7) for p in batch}
    assert ids == {point_id(f"k{i}") for i in range(40)}
    close_store(store)


def test_cli_embed_and_search_end_without_exception_text(tmp_path, tiny_model):
    spec = _spec(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "medsig.cli"]
    store = str(tmp_path / "q")
    embed = subprocess.run(cli + ["embed", str(spec), "--model", str(tiny_model), "--store",
                                  store, "--collection", "w", "--workers", "0"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert embed.returncode == 0, embed.stderr
    search = subprocess.run(cli + ["search", "--store", store, "--collection", "w", "--id",
                                   "a1", "-k", "3", "--where", "labels.urgency=needs attention",
                                   "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert search.returncode == 0, search.stderr
    for out in (embed, search):
        assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr
    assert "5 embedded" in embed.stdout
    hits = json.loads(search.stdout)
    assert {h["payload"]["id"] for h in hits} == {"a2", "a3"}


VANISHED = """
import shutil, sys
from medsig.index.runner import embed_collection
embed_collection(sys.argv[1], sys.argv[2], sys.argv[3], "w", num_workers=0, progress=False)
shutil.rmtree(sys.argv[3])  # the folder disappears before the process ends
"""


def test_store_removed_before_exit_is_one_line_not_a_traceback(tmp_path, tiny_model):
    spec = _spec(tmp_path)
    out = subprocess.run([sys.executable, "-c", VANISHED, str(spec), str(tiny_model),
                          str(tmp_path / "q")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
    assert "could not flush collection 'w'" in out.stderr


@pytest.mark.parametrize("graph_points", [None, 1000])
def test_flat_and_graph_search_find_the_exact_neighbours(tmp_path, monkeypatch, graph_points):
    from medsig.index import edge

    if graph_points:  # the graph, searched unfiltered; filters leaving < 2 MB scan exactly
        monkeypatch.setattr(edge, "GRAPH_POINTS", graph_points)
        monkeypatch.setattr(edge, "FULL_SCAN_KB", 2000)
    rng = np.random.default_rng(0)
    n, dim = 1500, 2048  # 12 MB of vectors: over the engine's threshold for optimizing
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    split = rng.choice(["train", "test"], n, p=[0.9, 0.1])
    col = edge.EdgeCollection(tmp_path, "g")
    col.create({"image": dim}, {"model": "m"}, {"split": "keyword", "id": "keyword"})
    ids = [point_id(f"r{i}") for i in range(n)]
    for s in range(0, n, 1024):
        col.upsert(ids[s:s + 1024], {"image": vecs[s:s + 1024]},
                   [{"id": f"r{i}", "split": str(split[i])} for i in range(s, min(n, s + 1024))])
    assert col.optimize()
    col.close()
    col = edge.EdgeCollection(tmp_path, "g")  # re-opened: the same index
    assert bool(col.info().get("graph")) == bool(graph_points)
    config = json.loads((col.shard_dir / "edge_config.json").read_text())
    assert config["vectors"]["image"]["hnsw_config"]["m"] == (16 if graph_points else 0)
    where = parse_where(["split=test"])
    for q in (3, 77, 1400):
        hits = col.query(vecs[q], "image", 5, None)
        assert str(hits[0].id) == ids[q]
        scores = np.where(split == "test", vecs @ vecs[q], -np.inf)
        expected = [ids[i] for i in np.argsort(-scores)[:5]]
        assert [str(h.id) for h in col.query(vecs[q], "image", 5, where)] == expected
    assert col.count() == n
    col.close()
