"""Benchmark: medsig on one accelerator against plain PyTorch on the same machine, one run.

For each model shape (random weights built from the published configs of
google/siglip-base-patch16-224 and google/medsiglip-448 with transformers' SiglipConfig):

  ceiling  the lower of: plain transformers, SDPA, the inference dtype, ready tensors on the device:
           image tower, text tower (64 tokens) and both towers (pairs/s), batch 256;
           and medsig's reader into a null model (same images, workers);
           a raw contrastive training step (image + text, sigmoid loss, bf16 autocast,
           fused AdamW) at batch 128;
  medsig   ``embed_collection`` (reader -> model -> embedded Qdrant store) and the eval
           embedding pass (``embed_arrays``, no store) over generated PNGs, and
           ``medsig.train`` (contrastive, same batch) steps/s after the first step;
  fidelity cosine of bf16 (or the auto dtype) against fp32 embeddings of the same images.

Prints the table (plain | medsig | ratio) and writes everything as JSON. Goals on an
H100/H200 (docs/gpu.md): embed >= 0.8 x min(both towers, input pipeline), training >= 0.9 x
the raw step. ``--smoke`` runs the same code on CPU with tiny sizes in well under a minute.

    .venv/bin/python bench/gpu.py --out results/gpu.json            # on the GPU machine
    .venv/bin/python bench/gpu.py --smoke --out /tmp/gpu_smoke.json  # anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# published shapes (config.json of the hub checkpoints); vocabulary 32,000, 64 text positions
SHAPES: dict[str, dict[str, Any]] = {
    "siglip-b16-224": {"hub": "google/siglip-base-patch16-224", "image": 224, "patch": 16,
                       "hidden": 768, "inter": 3072, "layers": 12, "heads": 12},
    "medsiglip-448": {"hub": "google/medsiglip-448", "image": 448, "patch": 14,
                      "hidden": 1152, "inter": 4304, "layers": 27, "heads": 16},
    "small": {"hub": None, "image": 96, "patch": 16, "hidden": 256, "inter": 1024,
              "layers": 4, "heads": 4},  # CPU figures
    "tiny": {"hub": None, "image": 32, "patch": 8, "hidden": 64, "inter": 256, "layers": 2,
             "heads": 4},
}
VOCAB, TEXT_LEN = 32000, 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict[str, Any], out: Path, device: torch.device
                ) -> tuple[Path, int]:
    """A random-weight SigLIP folder of ``shape`` (bf16 weights on GPU) that medsig loads."""
    from transformers import AutoModel, SiglipConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from medsig.models.tiny import train_tokenizer

    tok = train_tokenizer(1000, "siglip")
    tok.model_max_length = TEXT_LEN
    common = {"hidden_size": shape["hidden"], "intermediate_size": shape["inter"],
              "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"]}
    config = SiglipConfig(
        text_config={**common, "vocab_size": VOCAB, "max_position_embeddings": TEXT_LEN,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "projection_size": shape["hidden"]},
        vision_config={**common, "image_size": shape["image"], "patch_size": shape["patch"]})
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute
        model = AutoModel.from_config(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    size = {"height": shape["image"], "width": shape["image"]}
    SiglipImageProcessorPil(size=size).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return out, params


def _write_png(args: tuple[Path, int, int]) -> None:
    path, size, seed = args
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(90, 230, (5, 5, 3), dtype=np.uint8))
    img = base.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-3, 4, (size, size, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, compress_level=1)


def make_data(work: Path, n: int, size: int, workers: int) -> Path:
    """``n`` generated PNGs of ``size`` px (400 distinct pictures), a table with a text
    and a train/val split, and its spec."""
    import pandas as pd

    img = work / f"img{size}"
    img.mkdir(parents=True, exist_ok=True)
    distinct = min(n, 400)
    jobs = [(img / f"{i}.png", size, i) for i in range(distinct)]
    if workers:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_png, jobs, chunksize=8))
    else:
        list(map(_write_png, jobs))
    words = ["erythema", "plaque", "papule", "nevus", "ulcer", "scale", "macule", "crust"]
    rows = [{"id": f"r{i}", "file": f"{i % distinct}.png", "group": f"g{i}",
             "split": "val" if i % 50 == 0 else "train", "label": words[i % 8],
             "text": f"A skin photo with {words[i % 8]} on the {words[(i // 8) % 8]}."}
            for i in range(n)]
    pd.DataFrame(rows).to_csv(work / f"table{size}.csv", index=False)
    spec = work / f"spec{size}.yaml"
    spec.write_text(f"name: gpu{size}\ntable: table{size}.csv\nimage_root: img{size}\n"
                    "columns: {image: file, id: id, text: text, group: group, split: split}\n"
                    "labels:\n  - name: label\n    type: multiclass\n    column: label\n"
                    f"    classes: {words}\n")
    return spec


def rate(fn, n_items: int, iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return n_items * iters / (time.perf_counter() - start)


def ceiling(folder: Path, shape: dict, device: torch.device, dtype: torch.dtype, batch: int,
            iters: int, compile_too: bool = False) -> dict[str, float]:
    """Plain transformers forward on ready device tensors (no medsig code); with
    `compile_too` also the image tower under ``torch.compile`` (compile time excluded)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    x = torch.randn(batch, 3, shape["image"], shape["image"], device=device, dtype=dtype)
    ids = torch.randint(4, 1000, (batch, TEXT_LEN), device=device)
    with torch.inference_mode():
        img = rate(lambda: model.get_image_features(pixel_values=x), batch, iters, device)
        txt = rate(lambda: model.get_text_features(input_ids=ids), batch, iters, device)
    out = {"image_per_s": img, "text_per_s": txt, "pairs_per_s": 1 / (1 / img + 1 / txt)}
    if compile_too:
        vision = torch.compile(model.vision_model)
        with torch.inference_mode():
            t = time.perf_counter()
            vision(pixel_values=x)
            sync(device)
            out["compile_s"] = time.perf_counter() - t
            out["image_per_s_compiled"] = rate(lambda: vision(pixel_values=x), batch, iters,
                                               device)
    return out


CAUSES = ("plain step", "+ fused AdamW (CUDA) / foreach (CPU)", "+ clip_grad_norm_ 1.0",
          "+ cosine scheduler", "+ loss.item() every step")


def raw_train_step(folder: Path, shape: dict, device: torch.device, batch: int, steps: int,
                   causes: int = 1) -> float:
    """Pairs/s of forward + backward + AdamW, sigmoid loss, bf16 autocast on CUDA, with the
    first `causes` of CAUSES (1: the plain step with fused AdamW on CUDA, 2: + ... )."""
    from transformers import AutoModel, get_cosine_schedule_with_warmup

    model = AutoModel.from_pretrained(folder, dtype=torch.float32,
                                      attn_implementation="sdpa").to(device).train()
    fast = ({"fused": True} if device.type == "cuda" else {"foreach": True}) \
        if causes >= 2 else ({"fused": True} if device.type == "cuda" else {})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **fast)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10_000)
    x = torch.randn(batch, 3, shape["image"], shape["image"], device=device)
    ids = torch.randint(4, 1000, (batch, TEXT_LEN), device=device)
    labels = 2 * torch.eye(batch, device=device) - 1
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            img = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
            txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
            logits = img @ txt.T * model.logit_scale.exp() + model.logit_bias
        loss = -F.logsigmoid(labels * logits.float()).sum() / batch
        loss.backward()
        if causes >= 3:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if causes >= 4:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if causes >= 5:
            loss.item()

    return rate(step, batch, steps, device)


def step_causes(folder: Path, shape: dict, device: torch.device, batch: int, steps: int
                ) -> dict[str, float]:
    """The raw step with each of medsig's per-step extras added in turn (pairs/s)."""
    return {name: raw_train_step(folder, shape, device, batch, steps, causes=i + 1)
            for i, name in enumerate(CAUSES)}


def fidelity(folder: Path, spec: Path, device: torch.device, n: int = 64) -> dict[str, float]:
    """Cosine of the inference dtype's embeddings against fp32 ones (same images, texts)."""
    from medsig.data.collection import load_collection
    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder

    col = load_collection(spec).subset(list(range(n)))
    out = {}
    embs = {}
    for p in ("fp32", "auto"):
        enc = Encoder.load(folder, device=device, precision=p)
        image, text, _, _ = embed_arrays(enc, col, batch_size=32, num_workers=0)
        embs[p] = (image, text, str(enc.dtype).replace("torch.", ""))
        del enc
    for i, key in enumerate(("image", "text")):
        cos = (embs["fp32"][i] * embs["auto"][i]).sum(axis=1)
        out[f"{key}_cos_min"], out[f"{key}_cos_mean"] = float(cos.min()), float(cos.mean())
    out["dtype"] = embs["auto"][2]
    return out


def medsig_embed(folder: Path, spec: Path, device: torch.device, store: Path, batch: int | None,
                 workers: int | None) -> dict[str, Any]:
    """embed_collection (into the embedded store) and the eval pass (embed_arrays)."""
    from medsig.data.collection import load_collection
    from medsig.index.runner import embed_collection
    from medsig.index.store import close_store
    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder

    t = time.perf_counter()
    enc = Encoder.load(folder, device=device)
    load_s = time.perf_counter() - t
    col = load_collection(spec)
    try:
        rep = embed_collection(col, enc, store, "bench", batch_size=batch,
                               num_workers=workers, progress=False)
    finally:
        close_store(store)
    t = time.perf_counter()
    image, _, rows, _ = embed_arrays(enc, col, batch, workers)
    sync(device)
    arrays_s = time.perf_counter() - t
    return {"load_s": load_s, "embed_img_s": rep.images_per_second,
            "embed_seconds": rep.seconds, "embedded": rep.embedded,
            "arrays_img_s": len(rows) / arrays_s, "arrays_s": arrays_s}


def medsig_train(folder: Path, spec: Path, device: torch.device, out: Path, batch: int,
                 steps: int, workers: int, threads: int | None = None) -> dict[str, Any]:
    """``medsig.train`` contrastive; pairs/s between optimizer steps after the first."""
    from medsig.train import train

    stamps: list[float] = []
    cfg = {"spec": str(spec), "model": str(folder), "out": str(out), "objective":
           "contrastive", "device": device.type, "num_workers": workers,
           "precision": "bf16" if device.type == "cuda" else "fp32",
           "optim": {"max_steps": steps, "batch_size": batch, "lr": 1e-5},
           "eval": {"at_start": False}, "contrastive": {"loss": "sigmoid"}}
    if threads:
        cfg["threads"] = threads
    train(cfg, callback=lambda info: stamps.append(time.perf_counter()))
    gaps = np.diff(stamps[1:])  # steps 2.. : the first includes start-up and compilation
    return {"pairs_per_s": batch / float(np.mean(gaps)) if len(gaps) else float("nan"),
            "steps_timed": int(len(gaps))}


def pipeline_capacity(spec: Path, size: int, workers: int | None, batch: int) -> float:
    """images/s of medsig's reader into a null model on the same images and workers."""
    from medsig.data.collection import load_collection
    from medsig.data.reader import read_batches
    from medsig.data.transforms import Preprocess

    col = load_collection(spec)
    rows = list(range(min(len(col), 8000)))
    it = iter(read_batches(col.image_paths, rows, Preprocess(size), batch, workers,
                           draft_size=size, uint8=True))
    n = len(next(it).rows)  # worker start-up excluded
    start = time.perf_counter()
    n = sum(len(b.rows) for b in it)
    return n / (time.perf_counter() - start) if n else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and np.isfinite(b) else float("nan")


def run_shape(name: str, args: argparse.Namespace, work: Path, device: torch.device
              ) -> dict[str, Any]:
    from medsig.models.device import precision_dtype
    from medsig.system import available_cores

    shape = SHAPES[name]
    res: dict[str, Any] = {"shape": name, "like": shape["hub"]}
    t = time.perf_counter()
    folder, res["params"] = build_model(shape, work / f"model-{name}", device)
    n = args.n_images if shape["image"] <= 224 or args.smoke else args.n_images_large
    spec = make_data(work, n, shape["image"], 0 if args.smoke else available_cores())
    res["images"], res["setup_s"] = n, time.perf_counter() - t
    dtype = precision_dtype("auto", device)
    train_batch = args.train_batch if shape["image"] <= 224 else args.train_batch_large
    res["train_batch"] = train_batch
    stages: dict[str, float] = {}

    def timed(key: str, fn, *a):
        t = time.perf_counter()
        value = fn(*a)
        stages[key] = round(time.perf_counter() - t, 2)
        print(f"  [{name}] {key}: {stages[key]:.1f} s", file=sys.stderr, flush=True)
        return value

    res["ceiling"] = timed("ceiling", ceiling, folder, shape, device, dtype, args.batch,
                           args.iters, args.compile)
    res["step_causes"] = timed("raw_train", step_causes, folder, shape, device,
                               train_batch, args.iters)
    res["raw_train_pairs_s"] = res["step_causes"][CAUSES[0]]
    res["pipeline_img_s"] = timed("pipeline", pipeline_capacity, spec, shape["image"],
                                  args.workers, args.batch)
    res["fidelity"] = timed("fidelity", fidelity, folder, spec, device, min(64, n))
    res["medsig"] = timed("medsig_embed", medsig_embed, folder, spec, device,
                          work / f"store-{name}", args.batch, args.workers)
    res["medsig"]["train"] = timed("medsig_train", medsig_train, folder, spec, device,
                                   work / f"train-{name}", train_batch, args.train_steps,
                                   args.workers or max(1, available_cores() - 1), args.threads)
    res["stage_s"] = stages
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def table(res: dict[str, Any]) -> list[str]:
    c, m = res["ceiling"], res["medsig"]
    bound = min(c["pairs_per_s"], res["pipeline_img_s"])
    f = res["fidelity"]
    lines = [f"\n{res['shape']} ({res['params'] / 1e6:.0f} M parameters, like {res['like']}; "
             f"{res['images']} images, train batch {res['train_batch']}; {f['dtype']} vs fp32 "
             f"cosine: image min "
             f"{f['image_cos_min']:.5f}, text min {f['text_cos_min']:.5f})",
             f"{'what':<44}{'plain PyTorch':>15}{'medsig':>12}{'ratio':>8}",
             f"{'image tower forward (img/s)':<44}{c['image_per_s']:>15.1f}",
             *([f"{'image tower, torch.compile (img/s)':<44}{c['image_per_s_compiled']:>15.1f}"
                f"{'':>12}{ratio(c['image_per_s_compiled'], c['image_per_s']):>8.2f}"]
               if "image_per_s_compiled" in c else []),
             f"{'text tower forward (texts/s)':<44}{c['text_per_s']:>15.1f}",
             f"{'both towers (pairs/s)':<44}{c['pairs_per_s']:>15.1f}",
             f"{'input pipeline, null model (img/s)':<44}{'':>15}"
             f"{res['pipeline_img_s']:>12.1f}",
             f"{'embed image+text into the store (pairs/s)':<44}{bound:>15.1f}"
             f"{m['embed_img_s']:>12.1f}{ratio(m['embed_img_s'], bound):>8.2f}",
             f"{'eval embedding pass, no store (pairs/s)':<44}{bound:>15.1f}"
             f"{m['arrays_img_s']:>12.1f}{ratio(m['arrays_img_s'], bound):>8.2f}",
             f"{'contrastive train step (pairs/s)':<44}{res['raw_train_pairs_s']:>15.1f}"
             f"{m['train']['pairs_per_s']:>12.1f}"
             f"{ratio(m['train']['pairs_per_s'], res['raw_train_pairs_s']):>8.2f}"]
    lines += [f"  raw step {k:<38}{v:>15.1f}{'':>12}{ratio(v, res['raw_train_pairs_s']):>8.2f}"
              for k, v in res["step_causes"].items()]
    res["ratios"] = {"embed": ratio(m["embed_img_s"], bound),
                     "eval_pass": ratio(m["arrays_img_s"], bound),
                     "train": ratio(m["train"]["pairs_per_s"], res["raw_train_pairs_s"]),
                     "embed_bound_pairs_s": bound}
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (< 1 minute)")
    ap.add_argument("--shapes", default="siglip-b16-224,medsiglip-448")
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--n-images-large", type=int, default=5000,
                    help="images for shapes above 224 px (their forward is ~20x slower)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--train-batch-large", type=int, default=32,
                    help="training batch above 224 px (MedSigLIP-448: ~1 GB of activations "
                         "per image in bf16 without checkpointing)")
    ap.add_argument("--train-steps", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads, for the raw steps and medsig.train alike (CPU runs)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the image tower under torch.compile (is it worth a flag?)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.n_images, args.batch, args.train_batch = "tiny", 48, 16, 8
        args.train_steps, args.iters, args.workers, args.threads = 4, 2, 0, 1
    return args


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    start = time.perf_counter()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                               else "cpu", "torch": torch.__version__, "args": {
                                   k: str(v) for k, v in vars(args).items()}, "shapes": []}
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            res = run_shape(name, args, Path(tmp), device)
            lines = table(res)
            results["shapes"].append(res)
            print("\n".join(lines), flush=True)
    results["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\n{results['device']}: {results['seconds']:.0f} s; wrote {args.out}",
          file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
