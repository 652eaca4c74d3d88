"""Mapper: preprocessed batches and texts -> L2-normalised embeddings."""

from __future__ import annotations

import numpy as np
import torch

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
