"""Model outputs on one split, cached: embeddings, head and zero-shot probabilities.

Outputs are cached in ``out/cache/<model>.npz`` keyed by a fingerprint of (model files and
encoder, spec + table, split rows, device), so re-runs reuse them. Model folders are read
through ``medsig.models.artifact.Artifact`` (every folder kind, also a LoRA adapter).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsig.data.collection import Collection
from medsig.evaluate.tasks import ModelOutputs, main_label
from medsig.models.artifact import Artifact
from medsig.models.heads import total_outputs

CACHE_VERSION = 4


def _artifact(path: str) -> Artifact | None:
    """The model folder's record (None for a hub id or a folder without medsig.json)."""
    return Artifact.find(path) if Path(path).is_dir() else None


def _signature(path: str) -> list[Any]:
    p = Path(path)
    if not p.exists():
        return [path]  # a hub id
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def fingerprint(path: str, col: Collection, device: str | None = None) -> str:
    """sha256 of the model files (and base encoder), the spec + table bytes, the split rows."""
    from medsig.train.data import spec_fingerprint

    h = hashlib.sha256(spec_fingerprint(col).encode())
    art = _artifact(path)
    base = art.encoder_source(path) if art is not None and art.encoder != "." else None
    parts = {"v": CACHE_VERSION, "model": _signature(path), "ids": col.ids,
             "encoder": _signature(base) if base else None, "device": device}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _predict(predictor: Any, col: Collection, rows: np.ndarray, batch_size: int,
             num_workers: int | None) -> np.ndarray:
    from medsig.data.reader import read_batches

    k = total_outputs(predictor.heads)
    out = np.full((len(col), k), np.nan, np.float32)
    for b in read_batches(col.image_paths, rows.tolist(), predictor.preprocess, batch_size,
                          num_workers, draft_size=predictor.image_size):
        if b.rows:
            out[b.rows] = predictor.predict_pixels(b.pixels)
    return out[rows]


def compute_outputs(path: str, col: Collection, batch_size: int = 64, device: str | None = None,
                    num_workers: int | None = None) -> ModelOutputs:
    """Embed the split with one model; head probabilities and zero-shot where available."""
    from medsig.models.embedding import embed_arrays
    from medsig.models.predictor import load_encoder, load_predictor

    start = time.perf_counter()
    art = _artifact(path)
    predictor = None
    if art is not None and art.objective in ("classify", "probe") and art.heads:
        predictor = load_predictor(path, device=device)
        encoder = predictor.encoder
    else:
        encoder = load_encoder(path, device=device, artifact=art)
    has_text = encoder.tokenizer is not None
    image, text, rows, skipped = embed_arrays(encoder, col, batch_size, num_workers,
                                              texts=has_text)
    res = ModelOutputs(rows, image.astype(np.float32),
                       None if text is None else text.astype(np.float32))
    if predictor is not None and predictor.uses_embeddings:  # a probe: no second image pass
        res.probs = predictor.predict_embeddings(res.image)
    elif predictor is not None:
        res.probs = _predict(predictor, col, rows, batch_size, num_workers)
    if has_text:
        res.zeroshot, class_text = zeroshot_all(encoder, col.subset(rows), res.image)
        main = main_label(col)
        res.class_text = class_text[main] if main is not None else None
    gate = getattr(predictor.safety, "ood", None) if predictor is not None else None
    res_outliers = None
    if gate is not None:
        from medsig.evaluate.safety import outlier_scores, split_stats

        res_outliers = outlier_scores(predictor)  # medsig.evaluate.safety
        if gate.needs_stats:
            res.image_stats = split_stats(predictor, col, rows, batch_size, num_workers)
    res.info = {"kind": encoder.kind, "objective": art.objective if art else None,
                "folder_kind": art.kind if art else None,
                "heads": [h.to_dict() for h in predictor.heads] if predictor is not None
                else [],
                "embed_dim": int(image.shape[1]), "skipped_images": dict(skipped),
                "embed_seconds": round(time.perf_counter() - start, 3)}
    if res_outliers is not None:
        res.info["ood_outliers"] = res_outliers
    return res


def zeroshot_all(encoder: Any, col: Collection, image: np.ndarray
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per label: zero-shot probabilities (n, C) and class text embeddings (C, d).

    The same prompts, prompt ensembling and activation as ``zeroshot_probabilities``, with
    every prompt of every label embedded in one batch.
    """
    from medsig.models.zeroshot import class_probabilities, class_prompts, scale_bias

    prompts = class_prompts(col, list(col.labels))
    flat = [t for per in prompts.values() for texts in per.values() for t in texts]
    emb = encoder.embed_texts(flat).numpy().astype(np.float64)
    scale, bias = scale_bias(encoder)
    probs, classes, at = {}, {}, 0
    for label, per in prompts.items():
        rows = []
        for texts in per.values():
            mean = emb[at:at + len(texts)].mean(axis=0)
            rows.append(mean / np.linalg.norm(mean))
            at += len(texts)
        classes[label] = np.stack(rows).astype(np.float32)
        probs[label] = class_probabilities(image, classes[label], col.labels[label].kind,
                                           scale, bias, sigmoid=encoder.kind == "siglip")
    return probs, classes


def _save_cache(file: Path, fp: str, res: ModelOutputs) -> None:
    arrays = {"rows": res.rows, "image": res.image}
    for key in ("text", "probs", "class_text", "image_stats"):
        if getattr(res, key) is not None:
            arrays[key] = getattr(res, key)
    labels = list(res.zeroshot)
    arrays.update({f"zs_{i}": res.zeroshot[k] for i, k in enumerate(labels)})
    info = {**res.info, "zeroshot_labels": labels}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, fingerprint=np.array(fp), info=np.array(json.dumps(info)), **arrays)
    tmp.replace(file)


def _load_cache(file: Path, fp: str) -> ModelOutputs | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fp:
                return None
            info = json.loads(str(z["info"]))
            labels = info.pop("zeroshot_labels", [])
            get = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or old cache: recompute
    return ModelOutputs(get["rows"], get["image"], get.get("text"), get.get("probs"),
                        {k: get[f"zs_{i}"] for i, k in enumerate(labels)},
                        get.get("class_text"), info, get.get("image_stats"))


def model_outputs(name: str, path: str, col: Collection, cache_dir: Path | None,
                  batch_size: int = 64, device: str | None = None,
                  num_workers: int | None = None) -> ModelOutputs:
    """Cached outputs when the fingerprint matches, else compute (and cache) them."""
    fp = fingerprint(path, col, device)
    file = cache_dir / f"{name}.npz" if cache_dir is not None else None
    res = _load_cache(file, fp) if file is not None else None
    if res is not None:
        res.info["cache"] = "hit"
        return res
    res = compute_outputs(path, col, batch_size, device, num_workers)
    if file is not None:
        _save_cache(file, fp, res)
    res.info["cache"] = "miss"
    return res
