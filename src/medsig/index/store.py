"""Vector store: Qdrant embedded on a local path (default) or a Qdrant server URL.

Local mode keeps one client per path per process (qdrant-client allows only one). Its
sqlite file is switched to WAL with synchronous=NORMAL, which makes batched upserts about
5x faster (one commit per point otherwise waits for the disk) and stays crash-safe for
the process; only an OS crash may lose the last writes, which a re-run adds back.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from medsig.errors import ConfigError

MEDSIG_NAMESPACE = uuid.UUID("6f1c2b1e-8d0a-5c1e-9a7b-3d5e0f4a2c91")
_LOCAL_CLIENTS: dict[str, QdrantClient] = {}
_LOCK = threading.Lock()


def point_id(row_id: str) -> str:
    """Stable point id for a row id: the same image always gets the same point."""
    return str(uuid.uuid5(MEDSIG_NAMESPACE, str(row_id)))


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("http://", "https://"))


def open_client(location: str | Path) -> QdrantClient:
    """A Qdrant client for a local path (shared per process) or a server URL."""
    if is_url(location):
        return QdrantClient(url=str(location), api_key=os.environ.get("QDRANT_API_KEY"))
    key = str(Path(location).resolve())
    with _LOCK:
        client = _LOCAL_CLIENTS.get(key)
        if client is None:
            Path(key).mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=key)
            except RuntimeError as exc:  # another process holds the folder
                raise ConfigError(f"vector store {key} is in use by another process: "
                                  f"{str(exc).splitlines()[0]}") from None
            _LOCAL_CLIENTS[key] = client
        return client


def close_client(location: str | Path) -> None:
    if is_url(location):
        return
    with _LOCK:
        client = _LOCAL_CLIENTS.pop(str(Path(location).resolve()), None)
    if client is not None:
        client.close()


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


class VectorStore:
    """One Qdrant collection with named vectors (e.g. `image`, `text`)."""

    def __init__(self, location: str | Path, collection: str) -> None:
        self.location = str(location)
        self.collection = collection
        self.client = open_client(location)

    # -- collection ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.client.collection_exists(self.collection)

    def metadata(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        info = self.client.get_collection(self.collection)
        return dict(getattr(info.config, "metadata", None) or {})

    def vector_sizes(self) -> dict[str, int]:
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        if isinstance(vectors, dict):
            return {k: v.size for k, v in vectors.items()}
        return {"": vectors.size}

    def ensure(self, sizes: dict[str, int], metadata: dict[str, Any], recreate: bool = False
               ) -> None:
        """Create the collection, or check that an existing one matches (same model, dims)."""
        if self.exists() and recreate:
            self.client.delete_collection(self.collection)
        if self.exists():
            have, old = self.vector_sizes(), self.metadata()
            if old.get("model") and old.get("model") != metadata.get("model"):
                raise ConfigError(
                    f"collection '{self.collection}' holds embeddings of model "
                    f"'{old['model']}', not '{metadata.get('model')}': use another "
                    "--collection or --recreate")
            if have != sizes:
                raise ConfigError(f"collection '{self.collection}' has vectors {have}, "
                                  f"the model gives {sizes}: use --recreate")
        else:
            self.client.create_collection(
                self.collection,
                vectors_config={name: models.VectorParams(size=int(size),
                                                          distance=models.Distance.COSINE)
                                for name, size in sizes.items()},
                metadata=metadata,
            )
        self._tune_local()

    def _tune_local(self) -> None:
        """WAL + synchronous=NORMAL for the embedded store (see the module docstring)."""
        if is_url(self.location):
            return
        try:
            conn = self.client._client.collections[self.collection].storage.storage
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except (AttributeError, KeyError):  # other qdrant-client internals: keep defaults
            pass

    # -- points ----------------------------------------------------------------------------
    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count if self.exists() else 0

    def existing(self, ids: list[str], chunk: int = 2048) -> set[str]:
        """Which of these point ids are already stored."""
        if not self.exists():
            return set()
        found: set[str] = set()
        for s in range(0, len(ids), chunk):
            points = self.client.retrieve(self.collection, ids=ids[s:s + chunk],
                                          with_payload=False, with_vectors=False)
            found.update(str(p.id) for p in points)
        return found

    def upsert(self, ids: list[str], vectors: dict[str, np.ndarray],
               payloads: list[dict[str, Any]]) -> None:
        batch = models.Batch(ids=ids, vectors={k: np.asarray(v, dtype=np.float32).tolist()
                                               for k, v in vectors.items()},
                             payloads=payloads)
        self.client.upsert(self.collection, points=batch, wait=True)

    def get(self, pid: str, with_vectors: bool = True) -> Any:
        points = self.client.retrieve(self.collection, ids=[pid], with_payload=True,
                                      with_vectors=with_vectors)
        return points[0] if points else None

    def search(self, vector: np.ndarray, using: str, k: int = 5,
               where: models.Filter | None = None, exclude_id: str | None = None) -> list[Hit]:
        if not self.exists():
            raise ConfigError(f"no collection '{self.collection}' in {self.location}: "
                              "run `medsig embed` first")
        limit = k + (1 if exclude_id else 0)
        result = self.client.query_points(self.collection, query=np.asarray(vector).tolist(),
                                          using=using, limit=limit, query_filter=where,
                                          with_payload=True)
        hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in result.points
                if str(p.id) != exclude_id]
        return hits[:k]
