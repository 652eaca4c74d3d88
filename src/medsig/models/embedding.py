"""The batch-embedding engine: collection rows -> decoded batches -> L2-normalised image and
text embeddings. Below train, evaluate and index, which all embed through it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medsig.data.collection import Collection
from medsig.data.reader import ImageBatch, read_batches
from medsig.models.encoder import Encoder


def embed_image_batch(encoder: Encoder, pixels: torch.Tensor) -> np.ndarray:
    if pixels.numel() == 0:
        return np.zeros((0, encoder.embed_dim), dtype=np.float32)
    return encoder.embed_images(pixels).float().cpu().numpy()


def embed_text_batch(encoder: Encoder, texts: list[str]) -> np.ndarray | None:
    """Text embeddings, or None for an image-only encoder."""
    if encoder.tokenizer is None or not texts:
        return None
    return encoder.embed_texts(texts).float().cpu().numpy()


@dataclass
class EmbeddedBatch:
    rows: list[int]
    image: np.ndarray
    text: np.ndarray | None
    texts: list[str]
    skipped: list[tuple[int, str, str]]


def iter_embeddings(encoder: Encoder, collection: Collection, rows: list[int] | None = None,
                    batch_size: int = 64, num_workers: int | None = None,
                    timings: dict[str, float] | None = None, texts: bool = True
                    ) -> Iterator[EmbeddedBatch]:
    """Embed the images (and, with `texts`, the texts) of `rows` batch by batch."""
    rows = list(range(len(collection))) if rows is None else rows
    timings = timings if timings is not None else {}
    batches = read_batches(collection.image_paths, rows, encoder.preprocess, batch_size,
                           num_workers, draft_size=encoder.image_size)
    it = iter(batches)
    while True:
        start = time.perf_counter()
        batch: ImageBatch | None = next(it, None)
        timings["read_wait"] = timings.get("read_wait", 0.0) + time.perf_counter() - start
        if batch is None:
            return
        start = time.perf_counter()
        image = embed_image_batch(encoder, batch.pixels)
        strings = [collection.text(r) for r in batch.rows] if texts else []
        text = embed_text_batch(encoder, strings) if texts else None
        timings["model"] = timings.get("model", 0.0) + time.perf_counter() - start
        yield EmbeddedBatch(batch.rows, image, text, strings, batch.skipped)


def embed_arrays(encoder: Encoder, collection: Collection, batch_size: int = 64,
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
