"""The embedded engine: one Qdrant Edge shard per collection (HNSW, payload indexes, WAL).

Layout under a store folder: `collections/<name>/shard/` (the Edge shard) and
`collections/<name>/collection.json` (vector sizes, metadata, payload indexes). The shard's
write-ahead log makes every acknowledged upsert survive a kill -9; the shard holds an
exclusive lock on its WAL, so a second process gets a clear "in use" error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
from qdrant_client import models

from medsig.errors import ConfigError
from medsig.system import available_cores

FORMAT = 1
# Chosen with bench/index.py (docs/indexing.md): an HNSW graph (m=16, ef_construct=64, built
# on every core) on the `image` vectors, which searches use by default; int8 scalar
# quantization (kept in RAM, top hits rescored with the float32 vectors) makes the graph
# about 4x faster to build and scans cheaper. Other vectors (`text`) get no graph: searches
# over them scan the quantized vectors exactly. Below ~10 MB of vectors per segment (about
# 3,000 768-d points) and for filters that leave few points, Qdrant searches exactly.
HNSW = {"m": 16, "ef_construct": 64, "full_scan_threshold": 10000, "payload_m": 16}
GRAPH_VECTORS = ("image",)
SEARCH_EF = 128
OVERSAMPLING = 2.0  # quantized candidates per hit, rescored with float32
QUANTIZATION: Any = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99,
                                                always_ram=True)
SCHEMAS = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer}


def collection_dir(store: str | Path, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"bad collection name '{name}': use letters, digits, - and _")
    return Path(store) / "collections" / name


class EdgeCollection:
    """One collection in an embedded store, backed by a Qdrant Edge shard."""

    engine = "qdrant-edge"

    def __init__(self, store: str | Path, name: str) -> None:
        self.name = name
        self.dir = collection_dir(store, name).resolve()
        self.shard_dir = self.dir / "shard"
        self.info_file = self.dir / "collection.json"
        self._shard: qe.EdgeShard | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.info_file.is_file()

    def info(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        try:
            return json.loads(self.info_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.info_file}: unreadable collection info ({exc})") from None

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            if not self.exists():
                raise ConfigError(f"no collection '{self.name}' in {self.dir.parent.parent}: "
                                  "run `medsig embed` first")
            self._shard = _open(lambda: qe.EdgeShard.load(str(self.shard_dir)), self.dir)
        return self._shard

    def create(self, sizes: dict[str, int], metadata: dict[str, Any],
               indexes: dict[str, str]) -> None:
        self.drop()
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._shard = _open(lambda: qe.EdgeShard.create(str(self.shard_dir),
                                                        edge_config(sizes)), self.dir)
        self._write_info({"engine": self.engine, "format": FORMAT, "vectors": sizes,
                          "metadata": metadata, "payload_indexes": {}})
        self.add_indexes(indexes)

    def add_indexes(self, indexes: dict[str, str]) -> None:
        """Payload indexes on filtered fields (keyword / integer); existing ones are kept."""
        info = self.info()
        have = info.setdefault("payload_indexes", {})
        new = {k: v for k, v in indexes.items() if k not in have}
        for field, kind in new.items():
            self.shard.update(qe.UpdateOperation.create_field_index(field, SCHEMAS[kind]))
        if new:
            have.update(new)
            self._write_info(info)

    def drop(self) -> None:
        self.close()
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def close(self) -> None:
        if self._shard is not None:
            shard, self._shard = self._shard, None
            try:
                shard.flush()
            finally:
                shard.close()

    def optimize(self) -> bool:
        """Merge segments and build the HNSW graph now (blocks), then flush."""
        changed = bool(self.shard.optimize())
        self.shard.flush()
        return changed

    def _write_info(self, info: dict[str, Any]) -> None:
        tmp = self.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.info_file)

    # -- points ------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def retrieve(self, ids: list[str], with_payload: bool, with_vectors: bool) -> list[Any]:
        return self.shard.retrieve(ids, with_payload=with_payload, with_vector=with_vectors)

    def upsert(self, ids: list[str], vectors: dict[str, np.ndarray],
               payloads: list[dict[str, Any]]) -> None:
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()}
        points = [qe.Point(pid, {k: a[i] for k, a in arrays.items()}, payloads[i])
                  for i, pid in enumerate(ids)]
        self.shard.update(qe.UpdateOperation.upsert_points(points))

    def delete(self, ids: list[str]) -> None:
        self.shard.update(qe.UpdateOperation.delete_points(ids))

    def query(self, vector: np.ndarray, using: str, limit: int,
              where: models.Filter | None) -> list[Any]:
        request = qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(np.asarray(vector, np.float32), using=using),
            filter=to_edge_filter(where), with_payload=True,
            params=qe.SearchParams(hnsw_ef=SEARCH_EF, quantization=qe.QuantizationSearchParams(
                rescore=True, oversampling=OVERSAMPLING)))
        return self.shard.query(request)

    def scroll(self, offset: Any, limit: int) -> tuple[list[Any], Any]:
        return self.shard.scroll(qe.ScrollRequest(offset=offset, limit=limit,
                                                  with_payload=True, with_vector=True))


def edge_config(sizes: dict[str, int]) -> qe.EdgeConfig:
    """Vectors (cosine), the HNSW graph where searches need it, quantization."""
    threads = available_cores()
    graph = qe.HnswIndexConfig(max_indexing_threads=threads, **HNSW)
    no_graph = qe.HnswIndexConfig(**{**HNSW, "m": 0, "payload_m": 0},
                                  max_indexing_threads=threads)
    vectors = {k: qe.EdgeVectorParams(size=int(v), distance=qe.Distance.Cosine,
                                      hnsw_config=graph if k in GRAPH_VECTORS else no_graph)
               for k, v in sizes.items()}
    return qe.EdgeConfig(vectors=vectors, hnsw_config=graph,
                         quantization_config=QUANTIZATION)


def _open(fn, where: Path) -> qe.EdgeShard:
    try:
        return fn()
    except Exception as exc:  # the bindings raise plain Exception
        text = str(exc)
        if "WouldBlock" in text:
            raise ConfigError(f"vector store {where} is in use by another process "
                              "(one process at a time may open an embedded store)") from None
        raise ConfigError(f"cannot open vector store {where}: {text.splitlines()[0]}") from None


# -- filters: qdrant-client models -> Qdrant Edge --------------------------------------------
def to_edge_filter(flt: models.Filter | None) -> qe.Filter | None:
    """The same filter for the embedded engine (match, range, nested must/should/must_not)."""
    if flt is None:
        return None

    def conds(items: Any) -> list[Any] | None:
        if items is None:
            return None
        items = items if isinstance(items, list) else [items]
        return [_condition(c) for c in items]

    return qe.Filter(must=conds(flt.must), should=conds(flt.should),
                     must_not=conds(flt.must_not))


def _condition(cond: Any) -> Any:
    if isinstance(cond, models.Filter):
        return to_edge_filter(cond)
    if isinstance(cond, models.FieldCondition):
        if cond.match is not None and isinstance(cond.match, models.MatchValue):
            return qe.FieldCondition(key=cond.key, match=qe.MatchValue(cond.match.value))
        if cond.match is not None and isinstance(cond.match, models.MatchAny):
            return qe.FieldCondition(key=cond.key, match=qe.MatchAny(list(cond.match.any)))
        if cond.range is not None:
            r = cond.range
            return qe.FieldCondition(key=cond.key, range=qe.RangeFloat(
                gt=r.gt, gte=r.gte, lt=r.lt, lte=r.lte))
    if isinstance(cond, models.IsNullCondition):
        return qe.IsNullCondition(cond.is_null.key)
    if isinstance(cond, models.IsEmptyCondition):
        return qe.IsEmptyCondition(cond.is_empty.key)
    raise ConfigError(f"filter condition not supported by the embedded engine: {cond!r}")
