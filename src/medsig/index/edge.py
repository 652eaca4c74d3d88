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

FORMAT = 2  # 1: int8 codes and a graph at any size (kept as they were written)
# Chosen with bench/index.py (docs/indexing.md), on clustered 768-d points at 10k and 100k:
# - every vector is quantized to 4 bits (TurboQuant, kept in RAM); the top hits are rescored
#   with the float32 vectors (OVERSAMPLING candidates per hit);
# - below GRAPH_POINTS points there is no HNSW graph: a search scans the 4-bit codes of every
#   point (exact up to the rescoring; at 100k a few ms, recall@10 ~1.0, filtered too), and
#   `optimize` skips the graph build, which was most of the ingestion time (an HNSW graph at
#   100k took 25-40 CPU s to build). From GRAPH_POINTS on, `optimize` builds an HNSW graph on
#   `image` (searches use it by default; ef_construct 128: with 64 recall@10 at 100k varied
#   0.93-0.98) with payload-aware links on the filtered fields (split, labels.*); filters
#   that leave under FULL_SCAN_KB of vectors (~20,000 768-d points) are still searched exactly.
# Segments searched in parallel (one thread each): two halve the time of a scan on 2 cores.
SEGMENTS = max(2, min(8, available_cores()))
GRAPH_POINTS = 150_000  # a 2-core scan grows ~linearly: ~4.4 ms p50 at 100k
HNSW = {"m": 16, "ef_construct": 128, "payload_m": 16}
FULL_SCAN_KB = 60_000
GRAPH_VECTORS = ("image",)
SEARCH_EF = 256  # graph searches (from GRAPH_POINTS on)
OVERSAMPLING = 3.0  # quantized candidates per hit, rescored with float32
QUANTIZATION: Any = qe.TurboQuantQuantizationConfig(always_ram=True,
                                                    bits=qe.TurboQuantBitSize.Bits4)
LINKED = ("split",)  # with labels.*: the payload indexes that get payload-aware graph links


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
            self.shard.update(qe.UpdateOperation.create_field_index(field, index_params(field,
                                                                                       kind)))
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
        """Merge and quantize segments now (blocks), then flush; from GRAPH_POINTS points on,
        switch the collection to an HNSW graph (built here, once)."""
        info = self.info()
        if info.get("format") == FORMAT and not info.get("graph") and \
                self.count() >= GRAPH_POINTS:
            self.close()
            self._shard = _open(lambda: qe.EdgeShard.load(
                str(self.shard_dir), edge_config(info["vectors"], graph=True)), self.dir)
            info["graph"] = True
            self._write_info(info)
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
        # One float list per vector: the bindings convert lists about 2x faster than numpy
        # rows (bench/index.py), and the conversion is most of an upsert's cost.
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()}
        points = [qe.Point(pid, {k: a[i].tolist() for k, a in arrays.items()}, payloads[i])
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


def edge_config(sizes: dict[str, int], graph: bool = False) -> qe.EdgeConfig:
    """Vectors (cosine), 4-bit quantization, and (graph=True) the HNSW graph on `image`."""
    threads = available_cores()
    flat = qe.HnswIndexConfig(m=0, ef_construct=HNSW["ef_construct"], payload_m=0,
                              full_scan_threshold=FULL_SCAN_KB, max_indexing_threads=threads)
    linked = qe.HnswIndexConfig(**HNSW, full_scan_threshold=FULL_SCAN_KB,
                                max_indexing_threads=threads)
    vectors = {k: qe.EdgeVectorParams(size=int(v), distance=qe.Distance.Cosine,
                                      hnsw_config=linked if graph and k in GRAPH_VECTORS
                                      else flat)
               for k, v in sizes.items()}
    return qe.EdgeConfig(vectors=vectors, hnsw_config=linked if graph else flat,
                         quantization_config=QUANTIZATION,
                         optimizers=qe.EdgeOptimizersConfig(default_segment_number=SEGMENTS))


def index_params(field: str, kind: str) -> Any:
    """A payload index; only the fields searches filter on get payload-aware graph links."""
    linked = field in LINKED or field.startswith("labels.")
    if kind == "integer":
        return qe.IntegerIndexParams(lookup=True, range=True, enable_hnsw=linked)
    return qe.KeywordIndexParams(enable_hnsw=linked)


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
