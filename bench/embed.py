"""Benchmark: medsig embed+index against the per-image loop and the pure model forward.

Same model, same images, one run:
  (a) the per-image loop a user writes first: open one image, HF processor on it, model at
      batch 1 (image and text), one Qdrant upsert per point;
  (b) the model's pure forward time on ready tensors (image + text, same batch size);
  (c) medsig.embed_collection end to end (decode, preprocess, embed, write to Qdrant).
Prints images/s for each and the ratios. Goal: (c) >= 0.9 x (b) and >= 10 x (a).

    .venv/bin/python bench/embed.py [--n 339] [--image-size 224] [--hidden 384] [--layers 6]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from qdrant_client import QdrantClient, models
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from medsig.data.collection import load_collection
from medsig.data.images import load_image
from medsig.index.runner import embed_collection
from medsig.index.store import close_store
from medsig.models.encoder import Encoder
from medsig.models.tiny import write_tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-cxr"


def make_collection(work: Path, n: int) -> Path:
    """Real chest X-rays (mixed sizes up to 2000 px) when available, else generated images."""
    if SHARED.is_dir():
        meta = pd.read_csv(SHARED / "metadata.csv", dtype=str, keep_default_na=False)
        root = SHARED / "images"
        files = list(meta["filename"])
        notes = [c or f"Chest X-ray, {f}." for c, f in zip(meta["clinical_notes"], meta["finding"])]
        source = "covid-cxr (real X-rays, 375-2000 px)"
    else:
        from medsig.data.synth import synthesize

        spec = synthesize("radiology", work / "synth", n=min(n, 300), seed=0, image_size=256)
        col = load_collection(spec)
        root = col.spec.image_root_path
        files = [str(p.relative_to(root)) for p in col.image_paths]
        notes = col.texts()
        source = "generated radiology images (256 px)"
    rows = [{"id": f"r{i}", "file": files[i % len(files)], "text": notes[i % len(files)]}
            for i in range(n)]
    pd.DataFrame(rows).to_csv(work / "table.csv", index=False)
    spec = work / "spec.yaml"
    spec.write_text(f"name: bench\ntable: table.csv\nimage_root: {root}\n"
                    "columns: {image: file, id: id, text: text}\n")
    print(f"images: {n} rows over {len(set(files))} files from {source}")
    return spec


def per_image_loop(model_dir: Path, paths: list[Path], texts: list[str], store: Path) -> float:
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    client = QdrantClient(path=str(store))
    dim = model.config.text_config.projection_size if hasattr(
        model.config.text_config, "projection_size") else model.config.text_config.hidden_size
    client.create_collection("loop", vectors_config={
        k: models.VectorParams(size=dim, distance=models.Distance.COSINE)
        for k in ("image", "text")})
    start = time.perf_counter()
    for i, (path, text) in enumerate(zip(paths, texts)):
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        tokens = tokenizer([text], padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            img = model.get_image_features(**inputs).pooler_output[0]
            txt = model.get_text_features(**tokens).pooler_output[0]
        img, txt = img / img.norm(), txt / txt.norm()
        client.upsert("loop", points=[models.PointStruct(
            id=str(uuid.uuid4()), vector={"image": img.tolist(), "text": txt.tolist()},
            payload={"i": i, "text": text})])
    seconds = time.perf_counter() - start
    client.close()
    return seconds


def pure_forward(encoder: Encoder, paths: list[Path], texts: list[str], batch: int) -> float:
    pixels = torch.stack([encoder.preprocess(load_image(p, draft_size=encoder.image_size))
                          for p in paths])
    tokens = encoder.tokenize(texts)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            encoder.embed_images(pixels[s:s + batch])
            mask = tokens.get("attention_mask")
            encoder.text_features(tokens["input_ids"][s:s + batch],
                                  None if mask is None else mask[s:s + batch])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=339)
    ap.add_argument("--loop-n", type=int, default=60, help="images for the slow per-image loop")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medsig-bench-"))
    try:
        spec = make_collection(work, args.n)
        model_dir = write_tiny(work / "model", arch="siglip", image_size=args.image_size,
                               hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                               patch_size=args.patch)
        encoder = Encoder.load(model_dir, preprocess="resize")
        col = load_collection(spec)
        paths, texts = col.image_paths, col.texts()
        print(f"model: tiny SigLIP {args.image_size}px, hidden {args.hidden}, {args.layers} "
              f"layers, {sum(p.numel() for p in encoder.model.parameters()) / 1e6:.1f} M params; "
              f"torch threads {torch.get_num_threads()}")

        loop_s = per_image_loop(model_dir, paths[: args.loop_n], texts[: args.loop_n],
                                work / "q-loop")
        loop_ips = args.loop_n / loop_s
        fwd_s = pure_forward(encoder, paths, texts, args.batch_size)
        fwd_ips = len(paths) / fwd_s
        report = embed_collection(col, encoder, work / "q-medsig", "bench",
                                  batch_size=args.batch_size, num_workers=args.workers,
                                  progress=False)
        ours_ips = report.images_per_second
        close_store(work / "q-medsig")
        s = report.seconds
        print()
        print(f"{'pipeline':52s} {'images/s':>9s}")
        print(f"{'(a) per-image loop (batch 1, one upsert per point)':52s} {loop_ips:9.1f}")
        print(f"{'(b) pure model forward on ready tensors':52s} {fwd_ips:9.1f}")
        print(f"{'(c) medsig embed + index, end to end':52s} {ours_ips:9.1f}")
        print()
        print(f"medsig / pure forward = {ours_ips / fwd_ips:.2f}   (goal >= 0.9)")
        print(f"medsig / per-image loop = {ours_ips / loop_ips:.1f}x   (goal >= 10)")
        print(f"medsig stages (s): total {s['total']:.1f}, waiting for decoded images "
              f"{s.get('read_wait', 0):.1f}, model {s.get('model', 0):.1f}, "
              f"Qdrant writes (background thread) {s.get('write', 0):.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.random.seed(0)
    main()
