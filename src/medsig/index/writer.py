"""Writer: embeddings + payloads -> the vector store, on a background thread.

Batches are queued and upserted in large chunks while the model works on the next batch;
an error in the writer stops the run at the next put() or at close().
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from medsig.index.store import VectorStore


class StoreWriter:
    def __init__(self, store: VectorStore, flush_size: int = 1024, max_pending: int = 8) -> None:
        self.store, self.flush_size = store, flush_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._buffer: list[tuple[list[str], dict[str, np.ndarray], list[dict]]] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self.written = 0
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="medsig-writer", daemon=True)
        self._thread.start()

    def put(self, ids: list[str], vectors: dict[str, np.ndarray], payloads: list[dict[str, Any]]
            ) -> None:
        self._raise()
        if not ids:
            return
        self._buffer.append((ids, vectors, payloads))
        self._buffered += len(ids)
        if self._buffered >= self.flush_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        ids = [i for b in self._buffer for i in b[0]]
        names = self._buffer[0][1].keys()
        vectors = {k: np.concatenate([b[1][k] for b in self._buffer]) for k in names}
        payloads = [p for b in self._buffer for p in b[2]]
        self._buffer, self._buffered = [], 0
        self._queue.put((ids, vectors, payloads))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                start = time.perf_counter()
                self.store.upsert(*item)
                self.seconds += time.perf_counter() - start
                self.written += len(item[0])
            except BaseException as exc:  # reported to the caller thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Flush what is buffered, wait for every write, re-raise a writer error."""
        self._flush()
        self._queue.put(None)
        self._thread.join()
        self._raise()
