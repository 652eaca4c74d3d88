"""The batch-embedding engine: collection rows -> decoded batches -> L2-normalised image and
text embeddings. Below train, evaluate and index, which all embed through it.

Built to keep an accelerator busy: workers decode to uint8 and tokenise each batch's texts
once; batches arrive in pinned memory and are copied without blocking; normalisation runs
on the device; results come back to the host only when a batch is handed out, and the GPU
work of batch k+1 is queued before batch k is converted (double buffering), so there is no
host synchronisation between batches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medsig.data.collection import Collection
from medsig.data.reader import ImageBatch, read_batches
from medsig.models.device import default_batch_size, pin_memory
from medsig.models.encoder import Encoder


@dataclass
class EmbeddedBatch:
    rows: list[int]
    image: np.ndarray
    text: np.ndarray | None
    texts: list[str]
    skipped: list[tuple[int, str, str]]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a copy to the host; from CUDA into pinned memory without blocking."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


@dataclass
class _InFlight:
    """A batch whose GPU work (and copy back) is queued but maybe not finished."""

    batch: ImageBatch
    image: torch.Tensor
    text: torch.Tensor | None
    done: torch.cuda.Event | None

    def finish(self) -> EmbeddedBatch:
        if self.done is not None:
            self.done.synchronize()
        text = self.text.numpy() if self.text is not None else None
        return EmbeddedBatch(self.batch.rows, self.image.numpy(), text, self.batch.texts,
                             self.batch.skipped)


@torch.inference_mode()
def _launch(encoder: Encoder, batch: ImageBatch) -> _InFlight:
    if not batch.rows:
        return _InFlight(batch, torch.zeros(0, encoder.embed_dim), None, None)
    image = _to_host(encoder.image_embeddings(batch.pixels))
    text = None
    if batch.tokens is not None:
        text = _to_host(encoder.text_embeddings(batch.tokens))
    done = None
    if encoder.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    return _InFlight(batch, image, text, done)


def device_normalises(encoder: Encoder) -> bool:
    """uint8 batches normalised on an accelerator; on CPU the workers normalise (in
    parallel, off the compute thread)."""
    return encoder.preprocess.splits and encoder.device.type != "cpu"


def _add(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def iter_embeddings(encoder: Encoder, collection: Collection, rows: list[int] | None = None,
                    batch_size: int | None = None, num_workers: int | None = None,
                    timings: dict[str, float] | None = None, texts: bool = True
                    ) -> Iterator[EmbeddedBatch]:
    """Embed the images (and, with `texts`, the texts) of `rows` batch by batch.

    `timings` gains ``read_wait`` (waiting for workers), ``model`` (queueing the forward
    passes; all of it on CPU), ``device_wait`` (waiting for the GPU's results) and
    ``first_batch`` (from this call to the first batch handed out: worker start-up).
    """
    called = time.perf_counter()
    rows = list(range(len(collection))) if rows is None else rows
    timings = timings if timings is not None else {}
    strings = [collection.text(r) for r in rows] if texts else None
    tokenize = encoder.tokenize_fn() if texts and encoder.tokenizer is not None else None
    batches = read_batches(collection.image_paths, rows, encoder.preprocess,
                           batch_size or default_batch_size(encoder.device), num_workers,
                           draft_size=encoder.image_size, uint8=device_normalises(encoder),
                           texts=strings, tokenize=tokenize,
                           pin_memory=pin_memory(encoder.device))
    it = iter(batches)
    pending: _InFlight | None = None
    while True:
        start = time.perf_counter()
        batch: ImageBatch | None = next(it, None)
        _add(timings, "read_wait", start)
        if batch is None:
            break
        start = time.perf_counter()
        queued = _launch(encoder, batch)  # batch k+1 queued before batch k is converted
        _add(timings, "model", start)
        if pending is not None:
            yield _finish(pending, timings, called)
        pending = queued
    if pending is not None:
        yield _finish(pending, timings, called)


def _finish(pending: _InFlight, timings: dict[str, float], called: float) -> EmbeddedBatch:
    """Wait for a queued batch's device work and bring it to the host (timed)."""
    start = time.perf_counter()
    done = pending.finish()
    _add(timings, "device_wait", start)
    timings.setdefault("first_batch", time.perf_counter() - called)
    return done


def embed_arrays(encoder: Encoder, collection: Collection, batch_size: int | None = None,
                 num_workers: int | None = None, texts: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, Counter]:
    """All embeddings in memory: (image (n,d), text (n,d) | None, rows kept, skip counts)."""
    images, text_parts, kept, skipped = [], [], [], Counter()
    for b in iter_embeddings(encoder, collection, None, batch_size, num_workers,
                             texts=texts):
        images.append(b.image)
        if b.text is not None:
            text_parts.append(b.text)
        kept.extend(b.rows)
        skipped.update(reason for _, reason, _ in b.skipped)
    dim = encoder.embed_dim
    image = np.concatenate(images) if images else np.zeros((0, dim), np.float32)
    text = np.concatenate(text_parts) if text_parts else None
    return image, text, np.asarray(kept, dtype=np.int64), skipped
