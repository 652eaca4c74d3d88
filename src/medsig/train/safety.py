"""Fit a model folder's safe outputs on its own split: temperatures and conformal thresholds
on val, the OOD gate (embedding and image-statistics channels) from train (reference) and
val (channel p-values, threshold). Written by training (every
objective) and by ``medsig model safety DIR`` for an existing folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError
from medsig.models.calibration import fit_calibration
from medsig.models.conformal import DEFAULT_ALPHA, fit_conformal
from medsig.models.heads import Head
from medsig.models.ood import DEFAULT_FALSE_REJECT, MAX_REFERENCE, fit_ood
from medsig.models.safety import Safety


def split_outputs(predictor: Any, collection: Any, rows: np.ndarray, probs: bool = True,
                  batch_size: int = 64, num_workers: int | None = 0
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Raw (uncalibrated) head probabilities, image embeddings and image statistics
    (``medsig.data.image_stats``, from the same pixels) of ``rows`` (unreadable images
    skipped): (embeddings, probabilities or None, kept rows, statistics)."""
    from medsig.data.image_stats import pixel_stats
    from medsig.data.reader import read_batches

    embs, outs, kept, stats = [], [], [], []
    for b in read_batches(collection.image_paths, rows.tolist(), predictor.preprocess,
                          batch_size, num_workers, draft_size=predictor.image_size):
        if not b.rows:
            continue
        emb = predictor.embed(b.pixels)
        embs.append(emb)
        stats.append(pixel_stats(b.pixels, predictor.preprocess))
        if probs:
            outs.append(predictor.predict_embeddings(emb) if predictor.uses_embeddings
                        else predictor.raw_probabilities(b.pixels))
        kept.extend(b.rows)
    if not kept:
        raise ConfigError("no readable image to fit the safe outputs on")
    order = np.asarray(kept)
    return (np.concatenate(embs), np.concatenate(outs) if probs else None, order,
            np.concatenate(stats))


def _targets(collection: Any, heads: list[Head], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {h.name: np.asarray(collection.labels[h.name].targets)[rows]
            for h in heads if h.name in collection.labels}


def fit_safety(folder: str | Path, spec: str | Path | None = None,
               alpha: float | Mapping[str, float] = DEFAULT_ALPHA,
               false_reject: float = DEFAULT_FALSE_REJECT, seed: int = 0,
               batch_size: int = 64, device: str | None = None) -> Safety:
    """Fit and save (``safety.json``, ``ood.safetensors``) the folder's safe outputs."""
    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor

    folder = Path(folder)
    if not (folder / "medsig.json").is_file():
        raise ConfigError("not a medsig model folder (no medsig.json)", file=folder)
    predictor = load_predictor(folder, device=device, safe_outputs=False)  # raw outputs
    spec = spec or predictor.artifact.spec_path(folder)
    if not spec or not Path(spec).is_file():
        raise ConfigError("the model's dataset spec is not found: pass --spec", file=folder)
    collection = load_collection(spec)
    if collection.split is None:
        from medsig.data.split import split_collection

        collection = collection.with_split(split_collection(collection, seed=seed).split)
    split = np.asarray(collection.split)
    train_rows = np.nonzero(split == "train")[0]
    val_rows = np.nonzero(split == "val")[0]
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ConfigError("fitting the safe outputs needs train and val images", file=spec)
    rng = np.random.default_rng(seed)
    if len(train_rows) > MAX_REFERENCE:
        train_rows = np.sort(rng.choice(train_rows, MAX_REFERENCE, replace=False))
    train_emb, _, _, train_stats = split_outputs(predictor, collection, train_rows,
                                                 probs=False, batch_size=batch_size)
    val_emb, val_probs, val_kept, val_stats = split_outputs(predictor, collection, val_rows,
                                                            batch_size=batch_size)
    heads = [Head.of(h) for h in predictor.heads]
    targets = _targets(collection, heads, val_kept)
    temps = fit_calibration(heads, targets, val_probs)
    calibrated = Safety(calibration=temps).calibrate(heads, val_probs)
    safety = Safety(temps, fit_conformal(heads, targets, calibrated, alpha),
                    fit_ood(train_emb, val_emb, false_reject, seed=seed,
                            train_stats=train_stats, val_stats=val_stats),
                    {"n_train": int(len(train_emb)), "n_val": int(len(val_emb))})
    safety.save(folder)
    return safety
