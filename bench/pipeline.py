"""Benchmark: can the input pipeline feed a GPU? images/s per core with a null model.

medsig's reader (``data/reader.py``: read file -> decode (JPEG draft) -> pad -> resize ->
uint8 batch) is drained by a model that does nothing, on:
  (a) 224 px PNGs (generated, photo-like: smooth shading, shapes, sensor noise);
  (b) 1-4 megapixel JPEG photos (quality 90), decoded at a reduced scale (draft);
with 0 workers (the main process: one core), 1 and 2 DataLoader workers. Per core =
images per CPU-second of the main process and its workers together (psutil), which stays
meaningful on a busy shared machine where wall-clock rates do not. Also the CPU cost of
each stage (ms per image) and the float32 path (normalise on the CPU, as before) for
comparison. Goal: >= 400 img/s per core on 224 px images (16 cores then feed ~6,400
img/s). See docs/gpu.md for the cores each GPU needs.

    .venv/bin/python bench/pipeline.py [--n224 800] [--nphoto 120] [--out results/p.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medsig.data.images import load_image
from medsig.data.reader import read_batches
from medsig.data.transforms import Preprocess

PHOTO_SIZES = ((1280, 960), (1600, 1200), (2048, 1536), (2304, 1728))  # 1.2-4.0 MP
GOAL_PER_CORE = 400.0


def photo_like(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Skin-toned shading, a few blurred blobs and mild noise (compresses like a photo)."""
    small = Image.fromarray(rng.integers(120, 230, (6, 8, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(4):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 20, w // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in
                                                               rng.integers(60, 200, 3)))
    img = small.filter(ImageFilter.GaussianBlur(max(1, w // 200)))
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def make_images(work: Path, n224: int, nphoto: int, seed: int = 0) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    sets: dict[str, list[Path]] = {"png224": [], "jpeg1-4mp": []}
    base = [photo_like(224, 224, rng) for _ in range(min(n224, 50))]
    for i in range(n224):  # distinct files (no page-cache tricks), 50 distinct pictures
        p = work / f"p{i}.png"
        base[i % len(base)].rotate(90 * (i // len(base) % 4)).save(p)
        sets["png224"].append(p)
    photos = [photo_like(w, h, rng) for w, h in PHOTO_SIZES]
    for i in range(nphoto):
        p = work / f"j{i}.jpg"
        photos[i % len(photos)].save(p, quality=90)
        sets["jpeg1-4mp"].append(p)
    return sets


def _children_cpu() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def drain(paths: list[Path], pre: Preprocess, workers: int, batch: int, uint8: bool
          ) -> dict[str, float]:
    """The reader into a null model: wall img/s and img per CPU-second (main + workers).

    CPU seconds, not wall time, make the per-core rate meaningful on a shared machine;
    the workers' CPU is read after the last batch arrives, before they exit.
    """
    cpu0, wall0, n, workers_cpu = time.process_time(), time.perf_counter(), 0, 0.0
    for b in read_batches(paths, list(range(len(paths))), pre, batch, workers,
                          draft_size=pre.size, uint8=uint8):
        n += len(b.rows)
        if n >= len(paths) and workers:
            workers_cpu = _children_cpu()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0 + workers_cpu
    return {"img_s": n / wall, "img_per_cpu_s": n / cpu}


def stages(paths: list[Path], pre: Preprocess, k: int = 40) -> dict[str, float]:
    """Single-core ms per image: read + decode (draft), pad + resize + uint8, normalise."""
    out = {"decode_ms": 0.0, "resize_ms": 0.0, "normalise_ms": 0.0}
    for p in paths[:k]:
        t0 = time.process_time()
        im = load_image(p, draft_size=pre.size)
        t1 = time.process_time()
        u8 = pre.to_uint8(im)
        t2 = time.process_time()
        pre.normalize(u8.unsqueeze(0))
        t3 = time.process_time()
        out["decode_ms"] += t1 - t0
        out["resize_ms"] += t2 - t1
        out["normalise_ms"] += t3 - t2
    n = min(k, len(paths))
    return {key: round(1000 * v / n, 3) for key, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n224", type=int, default=800)
    ap.add_argument("--nphoto", type=int, default=120)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results: dict = {"note": "per core = images per CPU-second (main + workers); wall "
                             "img/s depends on the machine load", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_images(Path(tmp), args.n224, args.nphoto)
        for name, paths in sets.items():
            for size in ((224,) if name == "png224" else (224, 448)):
                pre = Preprocess(size, mode="pad")
                st = stages(paths, pre)
                print(f"\n{name} -> {size} px: CPU ms/image: {st}")
                for w in (int(x) for x in args.workers.split(",")):
                    u8 = drain(paths, pre, w, args.batch, uint8=True)
                    f32 = drain(paths, pre, w, args.batch, uint8=False)
                    per_core = u8["img_per_cpu_s"]
                    run = {"images": name, "size": size, "workers": w, "stages_cpu_ms": st,
                           "uint8": {k: round(v, 1) for k, v in u8.items()},
                           "float32": {k: round(v, 1) for k, v in f32.items()}}
                    results["runs"].append(run)
                    goal = f" (goal {GOAL_PER_CORE:.0f}: {per_core / GOAL_PER_CORE:.2f}x)" \
                        if name == "png224" else ""
                    print(f"  workers {w}: uint8 {per_core:6.1f} img per CPU-s{goal}, "
                          f"wall {u8['img_s']:6.1f} img/s | float32 (normalise on CPU) "
                          f"{f32['img_per_cpu_s']:6.1f} img per CPU-s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
