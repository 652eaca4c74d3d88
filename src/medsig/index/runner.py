"""embed_collection: reader -> mapper -> writer, timing each stage.

Stable point ids make runs resumable: rows already in the collection are not embedded again.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medsig.data.collection import Collection, load_collection
from medsig.index.payload import payload_indexes, row_payload
from medsig.index.store import VectorStore, point_id
from medsig.index.writer import StoreWriter
from medsig.models.embedding import iter_embeddings
from medsig.models.encoder import Encoder
from medsig.spec import DatasetSpec


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
                "points_after": self.points_after}


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
    """Embed every image (and text) of a collection into a Qdrant collection."""
    start_all = time.perf_counter()
    collection = spec if isinstance(spec, Collection) else load_collection(spec)
    name = collection_name or collection.spec.name
    with ThreadPoolExecutor(1) as pool:  # the store opens while the model loads
        opening = pool.submit(VectorStore, store, name)
        encoder = model if isinstance(model, Encoder) else Encoder.load(model, device=device)
        vs = opening.result()
    rows = list(range(len(collection)))[: limit if limit else None]
    sizes = {"image": encoder.embed_dim}
    if encoder.tokenizer is not None:
        sizes["text"] = encoder.embed_dim
    vs.ensure(sizes, {"model": encoder.name, "spec": collection.spec.name,
                      "image_size": encoder.image_size}, recreate=recreate,
              indexes=payload_indexes(collection))
    ids = {r: point_id(collection.ids[r]) for r in rows}
    done = vs.existing([ids[r] for r in rows])
    todo = [r for r in rows if ids[r] not in done]
    report = EmbedReport(name, str(store), len(rows), already_indexed=len(rows) - len(todo))
    timings: dict[str, float] = {}
    writer = StoreWriter(vs)
    bar = _progress(len(todo), progress)
    try:
        for b in iter_embeddings(encoder, collection, todo, batch_size, num_workers, timings):
            for _row, reason, message in b.skipped:
                report.skipped[reason] += 1
                if len(report.skipped_examples) < 10:
                    report.skipped_examples.append(message)
            vectors = {"image": b.image}
            if b.text is not None:
                vectors["text"] = b.text
            payloads = [row_payload(collection, r, t) for r, t in zip(b.rows, b.texts)]
            writer.put([ids[r] for r in b.rows], vectors, payloads)
            report.embedded += len(b.rows)
            if bar is not None:
                bar.update(len(b.rows) + len(b.skipped))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    timings["write"] = writer.seconds
    start = time.perf_counter()
    vs.optimize()  # the HNSW graph, once, after the last write
    timings["index"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    report.seconds = timings
    report.points_after = vs.count()
    return report


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from medsig.progress import progress_bar  # a live bar on a terminal, few lines in a log

    return progress_bar(total, "embed", "img")
