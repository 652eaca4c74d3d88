"""A collection on a Qdrant server (a URL), through qdrant-client.

Same layout as the embedded engine: named vectors, payload, stable ids, payload indexes on
filtered fields, medsig's metadata in the collection config. The same class reads a legacy
store written by qdrant-client's local mode (medsig before the Edge engine) so that
`medsig index export` can move it to the new engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from medsig.errors import ConfigError

SCHEMAS = {"keyword": models.PayloadSchemaType.KEYWORD,
           "integer": models.PayloadSchemaType.INTEGER}


def server_client(url: str) -> QdrantClient:
    return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"))


def legacy_client(path: str | Path) -> QdrantClient:
    """qdrant-client local mode on a store folder written by older medsig (read to migrate)."""
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:  # another process holds the folder
        raise ConfigError(f"vector store {path} is in use by another process: "
                          f"{str(exc).splitlines()[0]}") from None


def is_legacy_store(path: str | Path) -> bool:
    """A folder written by qdrant-client local mode (meta.json + collection/<name>/)."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "collection").is_dir()


class ServerCollection:
    """One collection through a qdrant-client (a server URL, or a legacy local folder)."""

    engine = "qdrant-server"

    def __init__(self, client: QdrantClient, name: str, owns_client: bool = True) -> None:
        self.client, self.name, self.owns_client = client, name, owns_client

    def exists(self) -> bool:
        return self.client.collection_exists(self.name)

    def info(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        config = self.client.get_collection(self.name).config
        vectors = config.params.vectors
        sizes = ({k: v.size for k, v in vectors.items()} if isinstance(vectors, dict)
                 else {"": vectors.size})
        return {"engine": self.engine, "vectors": sizes,
                "metadata": dict(getattr(config, "metadata", None) or {})}

    def create(self, sizes: dict[str, int], metadata: dict[str, Any],
               indexes: dict[str, str]) -> None:
        if self.exists():
            self.client.delete_collection(self.name)
        self.client.create_collection(
            self.name,
            vectors_config={k: models.VectorParams(size=int(v), distance=models.Distance.COSINE)
                            for k, v in sizes.items()},
            metadata=metadata)
        self.add_indexes(indexes)

    def add_indexes(self, indexes: dict[str, str]) -> None:
        if not indexes or self.client.init_options.get("path") is not None:
            return  # local mode (a legacy store) has no payload indexes
        for field, kind in indexes.items():
            self.client.create_payload_index(self.name, field, SCHEMAS[kind], wait=True)

    def drop(self) -> None:
        if self.exists():
            self.client.delete_collection(self.name)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def optimize(self) -> bool:
        return False  # a server builds its indexes in the background

    def count(self) -> int:
        return self.client.count(self.name, exact=True).count

    def retrieve(self, ids: list[str], with_payload: bool, with_vectors: bool) -> list[Any]:
        return self.client.retrieve(self.name, ids=ids, with_payload=with_payload,
                                    with_vectors=with_vectors)

    def upsert(self, ids: list[str], vectors: dict[str, np.ndarray],
               payloads: list[dict[str, Any]]) -> None:
        batch = models.Batch(ids=ids, vectors={k: np.asarray(v, dtype=np.float32).tolist()
                                               for k, v in vectors.items()},
                             payloads=payloads)
        self.client.upsert(self.name, points=batch, wait=True)

    def delete(self, ids: list[str]) -> None:
        self.client.delete(self.name, points_selector=ids, wait=True)

    def query(self, vector: np.ndarray, using: str, limit: int,
              where: models.Filter | None) -> list[Any]:
        return self.client.query_points(self.name, query=np.asarray(vector).tolist(),
                                        using=using, limit=limit, query_filter=where,
                                        with_payload=True).points

    def scroll(self, offset: Any, limit: int) -> tuple[list[Any], Any]:
        return self.client.scroll(self.name, offset=offset, limit=limit, with_payload=True,
                                  with_vectors=True)
