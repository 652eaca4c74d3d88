"""Vector store: Qdrant Edge embedded in the process (a folder) or a Qdrant server (a URL).

A folder means the embedded engine (`index/edge.py`: Qdrant's own engine in-process, 4-bit
codes or an HNSW graph, payload indexes, write-ahead log); an http(s) URL means a Qdrant
server through qdrant-client (`index/server.py`). Both hold the same layout: named vectors
(`image`, `text`), the payload, stable point ids and payload indexes on the filtered fields.
The engine was chosen with `bench/index.py` (docs/indexing.md).

Each collection is opened once per process and kept open (an embedded shard may be opened by
one process at a time); `close_store` closes what is open under a location, and everything
still open is closed cleanly when the interpreter exits.
"""

from __future__ import annotations

import atexit
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models

from medsig.errors import ConfigError

MEDSIG_NAMESPACE = uuid.UUID("6f1c2b1e-8d0a-5c1e-9a7b-3d5e0f4a2c91")
_OPEN: dict[tuple[str, str], Any] = {}
_CLIENTS: dict[str, Any] = {}
_LOCK = threading.RLock()


def point_id(row_id: str) -> str:
    """Stable point id for a row id: the same image always gets the same point."""
    return str(uuid.uuid5(MEDSIG_NAMESPACE, str(row_id)))


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("http://", "https://"))


def _key(location: str | Path) -> str:
    return str(location).rstrip("/") if is_url(location) else str(Path(location).resolve())


def open_collection(location: str | Path, name: str, legacy: bool = False) -> Any:
    """The engine object for one collection (shared per process until closed).

    `legacy=True` also reads a store written by qdrant-client's local mode (to export it).
    """
    from medsig.index.edge import EdgeCollection
    from medsig.index.server import ServerCollection, is_legacy_store, legacy_client, server_client

    key = (_key(location), name)
    with _LOCK:
        if key in _OPEN:
            return _OPEN[key]
        if is_url(location) or (legacy and is_legacy_store(location)):
            client = _CLIENTS.get(key[0])
            if client is None:
                client = server_client(key[0]) if is_url(location) else legacy_client(key[0])
                _CLIENTS[key[0]] = client
            backend = ServerCollection(client, name, owns_client=False)
        elif is_legacy_store(location):
            raise ConfigError(
                f"{location} was written by an older medsig (qdrant-client local mode): move "
                f"it with `medsig index export --store {location} --collection {name} "
                f"--out {name}.zip` and `medsig index import {name}.zip --store NEW_FOLDER`")
        else:
            backend = EdgeCollection(location, name)
        _OPEN[key] = backend
        return backend


def _take_open(location: str | Path | None) -> tuple[list[tuple[tuple[str, str], Any]],
                                                       list[Any]]:
    """Remove and return the collections ((location, name), backend) and clients open under
    ``location`` (None: everything)."""
    with _LOCK:
        keys = [k for k in _OPEN if location is None or k[0] == _key(location)]
        backends = [(k, _OPEN.pop(k)) for k in keys]
        clients = [_CLIENTS.pop(k) for k in list(_CLIENTS)
                   if location is None or k == _key(location)]
    return backends, clients


def close_store(location: str | Path | None = None) -> None:
    """Close the collections (and clients) open under `location` (None: everything)."""
    backends, clients = _take_open(location)
    for _, backend in backends:
        backend.close()
    for client in clients:
        client.close()


def _close_at_exit() -> None:
    """Close what is still open when the process ends; a failure is one line, not a traceback."""
    backends, clients = _take_open(None)
    for (location, name), backend in backends:
        try:
            backend.close()
        except Exception as exc:  # noqa: BLE001 - the process is ending; say it in one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"medsig: could not flush collection {name!r} in {location} at exit: {first}",
                  file=sys.stderr)
    for client in clients:
        try:
            client.close()
        except Exception:  # noqa: BLE001, S110 - a server client's close has nothing to lose
            pass


atexit.register(_close_at_exit)


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass
class StoredPoint:
    id: str
    vector: dict[str, list[float]]
    payload: dict[str, Any]


class VectorStore:
    """One collection with named vectors (e.g. `image`, `text`) in a store folder or server."""

    def __init__(self, location: str | Path, collection: str, legacy: bool = False) -> None:
        self.location = str(location)
        self.collection = collection
        self.backend = open_collection(location, collection, legacy=legacy)

    @property
    def engine(self) -> str:
        return self.backend.engine

    def close(self) -> None:
        with _LOCK:
            _OPEN.pop((_key(self.location), self.collection), None)
        self.backend.close()

    # -- collection ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.backend.exists()

    def metadata(self) -> dict[str, Any]:
        return dict(self.backend.info().get("metadata") or {})

    def vector_sizes(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.backend.info().get("vectors", {}).items()}

    def ensure(self, sizes: dict[str, int], metadata: dict[str, Any], recreate: bool = False,
               indexes: dict[str, str] | None = None) -> None:
        """Create the collection, or check that an existing one matches (same model, dims).

        `indexes`: payload fields to index for filtering, {"split": "keyword", ...}.
        """
        if self.exists() and not recreate:
            have, old = self.vector_sizes(), self.metadata()
            if old.get("model") and old.get("model") != metadata.get("model"):
                raise ConfigError(
                    f"collection '{self.collection}' holds embeddings of model "
                    f"'{old['model']}', not '{metadata.get('model')}': use another "
                    "--collection or --recreate")
            if have != sizes:
                raise ConfigError(f"collection '{self.collection}' has vectors {have}, "
                                  f"the model gives {sizes}: use --recreate")
            self.backend.add_indexes(indexes or {})
        else:
            self.backend.create(sizes, metadata, indexes or {})

    def optimize(self) -> bool:
        """Build the search index now (embedded engine); a server does it by itself."""
        return self.backend.optimize()

    # -- points ----------------------------------------------------------------------------
    def count(self) -> int:
        return self.backend.count() if self.exists() else 0

    def existing(self, ids: list[str], chunk: int = 2048) -> set[str]:
        """Which of these point ids are already stored."""
        if not self.exists():
            return set()
        found: set[str] = set()
        for s in range(0, len(ids), chunk):
            points = self.backend.retrieve(ids[s:s + chunk], False, False)
            found.update(str(p.id) for p in points)
        return found

    def upsert(self, ids: list[str], vectors: dict[str, np.ndarray],
               payloads: list[dict[str, Any]]) -> None:
        self.backend.upsert(ids, vectors, payloads)

    def delete(self, ids: list[str]) -> None:
        self.backend.delete(ids)

    def get(self, pid: str, with_vectors: bool = True) -> StoredPoint | None:
        points = self.backend.retrieve([pid], True, with_vectors)
        return _stored(points[0]) if points else None

    def scroll(self, batch: int = 512):
        """Every point (id, vectors, payload), in batches of StoredPoint."""
        offset = None
        while True:
            points, offset = self.backend.scroll(offset, batch)
            if points:
                yield [_stored(p) for p in points]
            if offset is None:
                return

    def search(self, vector: np.ndarray, using: str, k: int = 5,
               where: models.Filter | None = None, exclude_id: str | None = None) -> list[Hit]:
        if not self.exists():
            raise ConfigError(f"no collection '{self.collection}' in {self.location}: "
                              "run `medsig embed` first")
        limit = k + (1 if exclude_id else 0)
        points = self.backend.query(np.asarray(vector, dtype=np.float32), using, limit, where)
        hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points
                if str(p.id) != exclude_id]
        return hits[:k]


def _stored(point: Any) -> StoredPoint:
    vector = point.vector or {}
    if not isinstance(vector, dict):
        vector = {"": vector}
    return StoredPoint(str(point.id), dict(vector), dict(point.payload or {}))
