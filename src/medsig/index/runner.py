"""embed_collection: reader -> mapper -> writer, timing each stage.

Stable point ids make runs resumable: rows already in the collection are not embedded again.
Under torchrun / accelerate launch the rows are sharded across the processes
(`medsig.index.sharded`): one writer for the embedded store, every process for a server.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsig.data.collection import Collection, load_collection
from medsig.index.payload import payload_indexes, row_payload
from medsig.index.sharded import (
    Message,
    Receiver,
    barrier,
    broadcast_rows,
    join_process_group,
    peers_checked,
    rank_device,
    send_batch,
    send_done,
    shard,
)
from medsig.index.store import VectorStore, is_url, point_id
from medsig.index.writer import StoreWriter
from medsig.models.embedding import iter_embeddings
from medsig.models.encoder import Encoder
from medsig.spec import DatasetSpec
from medsig.train.distributed import world


@dataclass
class EmbedReport:
    collection: str
    store: str
    rows: int
    already_indexed: int = 0
    embedded: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    points_after: int = 0
    processes: int = 1
    rank: int = 0

    @property
    def images_per_second(self) -> float:
        total = self.seconds.get("total", 0.0)
        return self.embedded / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        return {"collection": self.collection, "store": self.store, "rows": self.rows,
                "already_indexed": self.already_indexed, "embedded": self.embedded,
                "skipped": dict(self.skipped), "skipped_examples": self.skipped_examples,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "images_per_second": round(self.images_per_second, 1),
                "points_after": self.points_after, "processes": self.processes}


def embed_collection(
    spec: DatasetSpec | Collection | str | Path,
    model: str | Path | Encoder,
    store: str | Path = "runs/qdrant",
    collection_name: str | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    recreate: bool = False,
    progress: bool = True,
) -> EmbedReport:
    """Embed every image (and text) of a collection into a Qdrant collection.

    Under a launcher (WORLD_SIZE > 1) every process embeds its share of the rows; rank 0's
    report counts all of them (stage seconds summed over the processes); the others' hold
    only their own stage seconds (`report.rank` > 0)."""
    join_process_group()
    with peers_checked():
        return _embed(spec, model, store, collection_name, batch_size, limit, device,
                      num_workers, recreate, progress)


def _embed(spec: DatasetSpec | Collection | str | Path, model: str | Path | Encoder,
           store: str | Path, collection_name: str | None, batch_size: int, limit: int | None,
           device: str | None, num_workers: int | None, recreate: bool, progress: bool
           ) -> EmbedReport:
    start_all = time.perf_counter()
    rank, procs = world()
    collection = spec if isinstance(spec, Collection) else load_collection(spec)
    name = collection_name or collection.spec.name
    with ThreadPoolExecutor(1) as pool:  # the store opens while the model loads
        opening = pool.submit(VectorStore, store, name) if rank == 0 else None
        encoder = model if isinstance(model, Encoder) else Encoder.load(
            model, device=rank_device(device))
        vs = opening.result() if opening is not None else None
    rows = list(range(len(collection)))[: limit if limit else None]
    ids = {r: point_id(collection.ids[r]) for r in rows}
    todo = _todo(vs, encoder, collection, rows, ids, recreate) if vs is not None else None
    todo = broadcast_rows(todo)  # decided once, by rank 0: the same on every process
    if vs is None and is_url(store):  # a server: every process writes (the collection exists)
        vs = VectorStore(store, name)
    report = EmbedReport(name, str(store), len(rows), already_indexed=len(rows) - len(todo),
                         processes=procs, rank=rank)
    timings: dict[str, float] = {}
    sink = _Sink(report, StoreWriter(vs) if vs is not None else None,
                 _progress(len(todo), progress and rank == 0))
    receiver = Receiver(procs - 1 if rank == 0 else 0, sink.take)
    try:
        for b in iter_embeddings(encoder, collection, shard(todo, rank, procs), batch_size,
                                 num_workers, timings):
            vectors = {"image": b.image} if b.text is None else {"image": b.image,
                                                                 "text": b.text}
            batch = {"ids": [ids[r] for r in b.rows], "n": len(b.rows),
                     "payloads": [row_payload(collection, r, t) for r, t in zip(b.rows, b.texts)],
                     "skipped": [[reason, message] for _r, reason, message in b.skipped]}
            _deliver(sink, batch, vectors, rank)
        receiver.join()
    finally:
        sink.close()
    return _finish(report, sink, vs, timings, start_all)


def _todo(vs: VectorStore, encoder: Encoder, collection: Collection, rows: list[int],
          ids: dict[int, str], recreate: bool) -> list[int]:
    """Create the collection if needed; the rows not yet in it."""
    sizes = {"image": encoder.embed_dim}
    if encoder.tokenizer is not None:
        sizes["text"] = encoder.embed_dim
    vs.ensure(sizes, {"model": encoder.name, "spec": collection.spec.name,
                      "image_size": encoder.image_size}, recreate=recreate,
              indexes=payload_indexes(collection))
    done = vs.existing([ids[r] for r in rows])
    return [r for r in rows if ids[r] not in done]


def _deliver(sink: _Sink, batch: dict, vectors: dict[str, np.ndarray], rank: int) -> None:
    """Rank 0 (or one process) writes; a worker sends the batch to rank 0, or, when it
    writes to a server itself, only the counts."""
    if rank == 0:
        sink.add(batch, vectors)
    elif sink.writer is not None:
        sink.writer.put(batch["ids"], vectors, batch["payloads"])
        send_batch({"n": batch["n"], "skipped": batch["skipped"]}, None)
    else:
        send_batch(batch, vectors)


def _finish(report: EmbedReport, sink: _Sink, vs: VectorStore | None,
            timings: dict[str, float], start_all: float) -> EmbedReport:
    """End of the run: workers report their timings; rank 0 builds the index and counts."""
    if sink.writer is not None:
        timings["write"] = sink.writer.seconds
    if report.rank > 0:
        send_done({"seconds": timings})
    if report.processes > 1:
        barrier()  # rank 0 has taken every message
    if report.rank > 0:
        report.seconds = timings
        return report
    _add_seconds(timings, sink.worker_seconds)
    start = time.perf_counter()
    vs.optimize()  # segments merged (graph from 150k points), once, at the end
    timings["index"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    report.seconds = timings
    report.points_after = vs.count()
    return report


def _add_seconds(into: dict[str, float], seconds: dict[str, float]) -> None:
    """Stage seconds summed over processes (the slowest start-up for ``first_batch``)."""
    for key, value in seconds.items():
        old = into.get(key, 0.0)
        into[key] = max(old, value) if key == "first_batch" else old + value


class _Sink:
    """Counts, writes and shows the progress of this process's batches and, on rank 0, of
    the workers' (from the receiver thread)."""

    def __init__(self, report: EmbedReport, writer: StoreWriter | None, bar) -> None:
        self.report, self.writer, self.bar = report, writer, bar
        self.worker_seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False

    def add(self, batch: dict, vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            if self._closed:
                return
            if self.writer is not None and batch.get("ids"):
                self.writer.put(batch["ids"], vectors, batch["payloads"])
            self.report.embedded += batch["n"]
            for reason, message in batch["skipped"]:
                self.report.skipped[reason] += 1
                if len(self.report.skipped_examples) < 10:
                    self.report.skipped_examples.append(message)
            if self.bar is not None:
                self.bar.update(batch["n"] + len(batch["skipped"]))

    def take(self, message: Message) -> None:
        if not message.done:
            self.add(message.info, message.vectors)
            return
        with self._lock:
            _add_seconds(self.worker_seconds, message.info["seconds"])

    def close(self) -> None:
        """Stop taking batches; flush and wait for the writer (re-raises its error)."""
        with self._lock:
            self._closed = True
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from medsig.progress import progress_bar  # a live bar on a terminal, few lines in a log

    return progress_bar(total, "embed", "img")
