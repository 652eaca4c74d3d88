"""Move a collection between stores (embedded folder, Qdrant server, legacy local mode).

Two safe formats, chosen by the file name (nothing is ever unpickled):
- `*.zip` (default): `manifest.json`, `points.jsonl` (one {"id", "payload"} per line) and
  `vectors/<name>.f32` (raw little-endian float32, one row per line of points.jsonl).
  Compact (vectors stored as bytes) and streamed both ways.
- `*.jsonl`: the manifest on line 1, then one {"id", "vectors", "payload"} per line.
Import upserts by point id, so an interrupted import can simply be run again.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError, DataError
from medsig.index.payload import indexes_for_payload
from medsig.index.store import VectorStore

KIND, VERSION = "medsig-index", 1
CHUNK = 1024


@dataclass
class TransferReport:
    collection: str
    points: int
    path: str
    seconds: float = 0.0


def export_collection(store: str | Path, collection: str, out: str | Path) -> TransferReport:
    """Write every point of a collection (ids, vectors, payloads, metadata) to a file."""
    import time

    start = time.perf_counter()
    vs = VectorStore(store, collection, legacy=True)
    if not vs.exists():
        raise ConfigError(f"no collection '{collection}' in {store}")
    sizes = vs.vector_sizes()
    manifest = {"format": KIND, "version": VERSION, "collection": collection,
                "engine": vs.engine, "vectors": sizes, "metadata": vs.metadata(),
                "payload_indexes": vs.backend.info().get("payload_indexes", {}),
                "count": vs.count()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    n = (_write_jsonl if out.suffix == ".jsonl" else _write_zip)(vs, manifest, tmp)
    tmp.replace(out)
    return TransferReport(collection, n, str(out), time.perf_counter() - start)


def _rows(vs: VectorStore, sizes: dict[str, int]) -> Iterator[tuple[str, dict, dict]]:
    for batch in vs.scroll():
        for p in batch:
            if set(p.vector) != set(sizes):
                raise ConfigError(f"point {p.id} has vectors {sorted(p.vector)}, the "
                                  f"collection declares {sorted(sizes)}")
            yield p.id, p.vector, p.payload


def _write_jsonl(vs: VectorStore, manifest: dict, path: Path) -> int:
    n = 0
    with open(path, "w") as f:
        f.write(json.dumps(manifest) + "\n")
        for pid, vectors, payload in _rows(vs, manifest["vectors"]):
            vec = {k: np.asarray(v, np.float32).tolist() for k, v in vectors.items()}
            f.write(json.dumps({"id": pid, "vectors": vec, "payload": payload}) + "\n")
            n += 1
    return n


def _write_zip(vs: VectorStore, manifest: dict, path: Path) -> int:
    names = list(manifest["vectors"])
    n = 0
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        files = {k: open(Path(tmp) / f"{k or 'default'}.f32", "wb") for k in names}
        with open(Path(tmp) / "points.jsonl", "w") as points:
            for pid, vectors, payload in _rows(vs, manifest["vectors"]):
                points.write(json.dumps({"id": pid, "payload": payload}) + "\n")
                for k in names:
                    files[k].write(np.asarray(vectors[k], "<f4").tobytes())
                n += 1
        for f in files.values():
            f.close()
        manifest = {**manifest, "count": n}
        with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            zf.write(Path(tmp) / "points.jsonl", "points.jsonl", zipfile.ZIP_DEFLATED)
            for f in files.values():
                zf.write(f.name, f"vectors/{Path(f.name).name}", zipfile.ZIP_STORED)
    return n


def import_collection(path: str | Path, store: str | Path, collection: str | None = None,
                      recreate: bool = False) -> TransferReport:
    """Load an exported file into a store (embedded folder or server URL)."""
    import time

    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    reader = _read_jsonl if path.suffix == ".jsonl" else _read_zip
    manifest, batches = reader(path)
    name = collection or manifest["collection"]
    first = next(batches, None)
    indexes = manifest.get("payload_indexes") or (
        indexes_for_payload(first[2][0]) if first else {})  # legacy exports record none
    vs = VectorStore(store, name)
    vs.ensure(manifest["vectors"], manifest.get("metadata") or {}, recreate=recreate,
              indexes=indexes)
    n = 0
    for ids, vectors, payloads in itertools.chain([first] if first else [], batches):
        vs.upsert(ids, vectors, payloads)
        n += len(ids)
    if n != manifest.get("count", n):
        raise DataError(f"holds {n} points, its manifest says {manifest['count']}", file=path)
    vs.optimize()
    return TransferReport(name, n, str(store), time.perf_counter() - start)


def _check_manifest(manifest: Any, path: Path) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != KIND:
        raise DataError("not a medsig index export (no manifest)", file=path)
    if manifest.get("version") != VERSION:
        raise DataError(f"export version {manifest.get('version')} is not {VERSION}", file=path)
    sizes = manifest.get("vectors")
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v > 0
                                              for v in sizes.values()):
        raise DataError("manifest 'vectors' must map names to sizes", file=path)
    if not isinstance(manifest.get("collection"), str):
        raise DataError("manifest has no collection name", file=path)
    return manifest


def _point(line: str, path: Path, row: int, sizes: dict[str, int] | None) -> dict:
    try:
        point = json.loads(line)
    except ValueError as exc:
        raise DataError(f"not JSON ({exc.msg})", file=path, row=row) from None
    if not isinstance(point, dict) or not isinstance(point.get("payload"), dict):
        raise DataError("a point needs an 'id' and a 'payload' object", file=path, row=row)
    try:
        point["id"] = str(uuid.UUID(str(point.get("id"))))
    except ValueError:
        raise DataError(f"point id {point.get('id')!r} is not a UUID", file=path,
                        row=row) from None
    if sizes is not None:
        vectors = point.get("vectors")
        if not isinstance(vectors, dict) or set(vectors) != set(sizes):
            raise DataError(f"a point needs the vectors {sorted(sizes)}", file=path, row=row)
        for k, size in sizes.items():
            arr = np.asarray(vectors[k], dtype=np.float32)
            if arr.shape != (size,) or not np.isfinite(arr).all():
                raise DataError(f"vector '{k}' must be {size} finite numbers", file=path,
                                row=row)
            vectors[k] = arr
    return point


def _batches(points: Iterator[dict], names: list[str]):
    ids: list[str] = []
    vecs: dict[str, list] = {k: [] for k in names}
    payloads: list[dict] = []
    for p in points:
        ids.append(p["id"])
        payloads.append(p["payload"])
        for k in names:
            vecs[k].append(p["vectors"][k])
        if len(ids) == CHUNK:
            yield ids, {k: np.stack(v) for k, v in vecs.items()}, payloads
            ids, vecs, payloads = [], {k: [] for k in names}, []
    if ids:
        yield ids, {k: np.stack(v) for k, v in vecs.items()}, payloads


def _read_jsonl(path: Path):
    f = open(path)
    first = f.readline()
    try:
        manifest = _check_manifest(json.loads(first), path)
    except ValueError:
        f.close()
        raise DataError("line 1 must be the manifest (JSON)", file=path) from None
    sizes = manifest["vectors"]

    def points():
        with f:
            for row, line in enumerate(f, start=2):
                if line.strip():
                    yield _point(line, path, row, sizes)

    return manifest, _batches(points(), list(sizes))


def _read_zip(path: Path):
    try:
        zf = zipfile.ZipFile(path)
        manifest = _check_manifest(json.loads(zf.read("manifest.json")), path)
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise DataError("not a medsig index export (zip with manifest.json)", file=path) from None
    sizes = manifest["vectors"]

    def points():
        with zf:
            streams = {k: zf.open(f"vectors/{k or 'default'}.f32") for k in sizes}
            with zf.open("points.jsonl") as lines:
                for row, raw in enumerate(lines, start=1):
                    point = _point(raw.decode("utf-8"), path, row, None)
                    point["vectors"] = {}
                    for k, size in sizes.items():
                        data = streams[k].read(4 * size)
                        if len(data) != 4 * size:
                            raise DataError(f"vectors/{k}.f32 ends before point {row}",
                                            file=path)
                        point["vectors"][k] = np.frombuffer(data, "<f4")
                    yield point

    return manifest, _batches(points(), list(sizes))
