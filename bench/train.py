"""Benchmark: medsig training on generated dermatology data with a tiny SigLIP, on CPU.

Four experiments, each compared side by side in one run (same data, split, seed and
tiny-model initialisation everywhere):

1. losses: standard sigmoid vs multi-positive sigmoid (positives = same coarse category /
   any shared condition), texts = a random spec template per row and epoch, so batches of
   32 hold repeated conditions whose texts differ (negatives for the standard loss).
   On the test split, before and after training: k-means NMI of the image embeddings
   (single-label rows, k = number of their classes; condition and category) and
   image->text Recall@1 where any text of the same (dominant) condition / category counts.
2. gradient accumulation: naive (4 micro-batches of 8, each its own 8x8 loss) vs gradient
   caching (one 32x32 loss over the same 32 rows), next to the plain batch-32 run of (1):
   the loss each actually sees, a gradient check on one batch, final val / test metrics and
   time per optimizer step.
3. peak memory of one forward + backward of the loss at 4,096 pairs (--quick: 2,048),
   d = 768, chunked vs unchunked, sigmoid and softmax: each in its own subprocess, peak RSS
   (VmHWM after resetting it) with glibc's default allocator and with
   MALLOC_MMAP_THRESHOLD_ fixed (RSS then follows live memory), plus torch's CPU profiler
   (`medsig.train.losses.loss_peak_memory`).
4. throughput: medsig's training loop at the bench's torch threads with num_workers 0 and
   no read-ahead (prefetch 0: images decoded between steps), num_workers 0 (a read-ahead
   thread), num_workers 1 (a loader process), and with medsig's defaults (loader and torch
   threads chosen from the cores) vs a raw forward + backward + AdamW step of the same
   model on ready tensors (same batch size, same loss). Images/s from the median time
   between optimizer steps (data loading + augmentation included); rounds of raw, loops,
   raw, each loop compared with the raw steps around it; the median ratio (goal >= 0.85)
   is printed, with the measured data-loading time per batch.

    .venv/bin/python bench/train.py [--quick] [--n 1000] [--epochs 8] [--threads 1]
                                    [--work DIR] [--out bench/results/train.json]

Results go to `--out` (JSON, rewritten after every experiment); the training runs' own
output (progress, eval lines) goes to WORK/logs/. Timings are wall-clock on a possibly
shared machine: the JSON records the load average around each experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LR = 2e-3  # the tiny random model needs a large learning rate (as in `medsig demo`)


# ----------------------------------------------------------------------------- helpers
def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)


@contextlib.contextmanager
def quiet(log: Path):
    """Send everything the training loop prints (eval lines, warnings) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# ----------------------------------------------------------------------------- setup
def setup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generated derm data (split by case), a tiny SigLIP; both written once."""
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    t = time.perf_counter()
    with quiet(work / "logs" / "setup.log"):
        spec = synthesize("derm", work / "data", n=args.n, seed=args.seed,
                          image_size=args.image_size)
        col = load_collection(spec)
        result = split_collection(col, seed=args.seed)
        splits, _ = write_split(col, result, spec.parent)
        set_spec_splits(spec, splits.name)
        base = write_tiny(work / "base", arch="siglip", image_size=args.image_size,
                          seed=args.seed)
    col = load_collection(spec)
    return {"spec": spec, "base": base, "collection": col, "counts": result.counts(),
            "seconds": time.perf_counter() - t}


def config(args: argparse.Namespace, env: dict[str, Any], out: Path, **sections: Any
           ) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "spec": str(env["spec"]), "model": str(env["base"]), "out": str(out),
        "objective": "contrastive", "seed": args.seed, "num_workers": 0, "device": "cpu",
        "precision": "fp32", "threads": torch.get_num_threads(),
        "optim": {"epochs": args.epochs, "batch_size": 32, "lr": LR},
        "data": {"text": "templates"},
        "contrastive": {"loss": "sigmoid", "main_label": "condition"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def train_and_test(args: argparse.Namespace, env: dict[str, Any], work: Path, name: str,
                   over: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """A timed training run with test metrics of its best (folder) and last checkpoints."""
    run = timed_train(config(args, env, work / "runs" / name, **over),
                      work / "logs" / f"{name}.log")
    run["test"] = test_metrics(run["out"], env, texts, args.seed)
    run["test_last"] = test_metrics(run["out"], env, texts, args.seed,
                                    Path(run["out"]) / "checkpoints" / "last"
                                    / "trainable.safetensors")
    return run


def timed_train(cfg: dict[str, Any], log: Path) -> dict[str, Any]:
    """Train; the time between consecutive optimizer steps (callback) gives the step time."""
    from medsig.train import train

    stamps: list[float] = []
    t = time.perf_counter()
    with quiet(log):
        out = train(cfg, callback=lambda info: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t
    info = json.loads((Path(out) / "medsig.json").read_text())
    gaps = np.diff(stamps)
    return {"out": str(out), "wall_s": wall, "steps": info["training"]["steps"],
            "train_seconds": info["training"]["seconds"],
            "step_s_median": float(np.median(gaps)) if len(gaps) else float("nan"),
            "step_s_mean": float(np.mean(gaps)) if len(gaps) else float("nan"),
            "metrics": info["metrics"]}


def single_label_rows(lab: Any) -> np.ndarray:
    t = lab.targets
    return np.nonzero((t > 0).sum(axis=1) == 1)[0] if t.ndim == 2 else np.nonzero(t >= 0)[0]


def test_metrics(model_dir: str | Path, env: dict[str, Any], texts: list[str], seed: int,
                 weights: Path | None = None) -> dict[str, Any]:
    """NMI (k-means on image embeddings of single-label rows) and R@1 by class, test split.

    `weights`: a checkpoint's trainable.safetensors loaded over the folder's model (the
    last-epoch weights; the folder itself holds the best-val-checkpoint weights)."""
    from medsig.metrics.clustering import clustering_metrics
    from medsig.metrics.retrieval import retrieval_ranks, summarize_ranks
    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder
    from medsig.train.data import single_class

    test = env["test"]
    enc = Encoder.load(model_dir, device="cpu")
    if weights is not None:
        from safetensors.torch import load_file

        from medsig.train.adapt import load_trainable_state

        load_trainable_state(enc.model, load_file(str(weights)))
    img, _, kept, _ = embed_arrays(enc, test, batch_size=64, num_workers=0, texts=False)
    txt = enc.embed_texts([texts[r] for r in kept]).numpy()
    out: dict[str, Any] = {}
    # mean pairwise cosine of the image embeddings (1.0 = collapsed to one direction)
    out["mean_cos_image"] = float(np.linalg.norm(img.mean(axis=0)) ** 2)
    for name in ("condition", "category"):
        lab = test.labels[name]
        groups = single_class(test, name)[kept]
        ri, _ = retrieval_ranks(img, txt, positives=groups)
        s = summarize_ranks(ri, (1, 5))
        out[f"r1_{name}"], out[f"r5_{name}"] = s["recall@1"], s["recall@5"]
        ok = groups >= 0  # chance R@1: share of the gallery with the query's class
        share = np.array([(groups == g).mean() for g in groups[ok]])
        out[f"chance_r1_{name}"] = float(share.mean())
        single = np.intersect1d(single_label_rows(lab), kept)
        pos = np.searchsorted(kept, single)
        cm = clustering_metrics(img[pos], groups[pos], seed=seed, n_init=10)
        out[f"nmi_{name}"], out[f"k_{name}"], out[f"n_{name}"] = cm["nmi"], cm["k"], cm["n"]
    ri, _ = retrieval_ranks(img, txt)  # its own text only (the exact pair)
    out["r1_exact_pair"] = summarize_ranks(ri, (1,))["recall@1"]
    return out


def chance_nmi(n: int, k: int, dim: int, seed: int, reps: int = 5) -> float:
    """NMI of k-means on random embeddings against random labels of the same sizes."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(reps):
        x = rng.standard_normal((n, dim))
        y = rng.integers(0, k, n)
        c = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        vals.append(normalized_mutual_info_score(y, c))
    return float(np.mean(vals))


def batch_stats(env: dict[str, Any], texts: list[str], bs: int, seed: int) -> dict[str, float]:
    """Per batch of `bs` train rows: off-diagonal pairs sharing the dominant condition, any
    condition, a category; how many of the same-condition pairs have different texts."""
    from medsig.train.data import single_class, step_batches

    train = env["train"]
    dom = single_class(train, "condition")
    cond = (train.labels["condition"].targets > 0).astype(np.float32)
    cat = (train.labels["category"].targets > 0).astype(np.float32)
    batches = step_batches(np.arange(len(train)), bs, seed, True)
    rows: dict[str, list[float]] = {"same_condition": [], "any_shared_condition": [],
                                    "same_category": [], "same_condition_other_text": []}
    for b in batches:
        b = np.asarray(b)
        off = ~np.eye(len(b), dtype=bool)
        same = (dom[b][:, None] == dom[b][None, :]) & (dom[b] >= 0)[:, None] & off
        t = np.asarray([texts[i] for i in b], dtype=object)
        rows["same_condition"].append(same.sum() / 2)
        rows["any_shared_condition"].append(((cond[b] @ cond[b].T > 0) & off).sum() / 2)
        rows["same_category"].append(((cat[b] @ cat[b].T > 0) & off).sum() / 2)
        rows["same_condition_other_text"].append((same & (t[:, None] != t[None, :])).sum() / 2)
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    return out | {"batches": len(batches), "pairs_per_batch": bs * (bs - 1) / 2}


# ----------------------------------------------------------------------------- exp 1
LOSS_RUNS = {
    "sigmoid": {"contrastive": {"loss": "sigmoid"}},
    "mp_sigmoid_coarse": {"contrastive": {"loss": "multi_positive_sigmoid",
                                          "positives": "coarse"}},
    "mp_sigmoid_any_shared": {"contrastive": {"loss": "multi_positive_sigmoid",
                                              "positives": "any_shared"}},
}


def exp_losses(args: argparse.Namespace, env: dict[str, Any], work: Path) -> dict[str, Any]:
    say("\n== 1. standard sigmoid vs multi-positive sigmoid (test split) ==")
    texts = env["test"].texts(random.Random(args.seed))  # one random template per row
    train_texts = env["train"].texts(random.Random(args.seed))
    stats = batch_stats(env, train_texts, 32, args.seed)
    say(f"per batch of 32 ({stats['pairs_per_batch']:.0f} pairs, mean over {stats['batches']}"
        f" batches): {stats['same_condition']:.1f} same dominant condition "
        f"({stats['same_condition_other_text']:.1f} with different texts), "
        f"{stats['any_shared_condition']:.1f} share a condition, "
        f"{stats['same_category']:.1f} share a category")
    res: dict[str, Any] = {"batch_stats": stats, "load_before": load()}
    res["before"] = test_metrics(env["base"], env, texts, args.seed)
    runs = {}
    for name, over in LOSS_RUNS.items():
        if args.quick and name == "mp_sigmoid_coarse":
            continue
        runs[name] = run = train_and_test(args, env, work, name, over, texts)
        say(f"  trained {name}: {run['steps']} steps in {run['wall_s']:.1f} s (best val R@1 "
            f"at step {run['metrics']['val']['step']})")
    res["runs"] = runs
    b = res["before"]
    res["chance"] = {f"nmi_{name}": chance_nmi(b[f"n_{name}"], b[f"k_{name}"], 64, args.seed)
                     for name in ("condition", "category")}
    res["chance"].update({f"r1_{name}": b[f"chance_r1_{name}"]
                          for name in ("condition", "category")})
    res["load_after"] = load()
    keys = [("nmi_condition", "NMI cond"), ("nmi_category", "NMI cat"),
            ("r1_condition", "R@1 cond"), ("r5_condition", "R@5 cond"),
            ("r1_category", "R@1 cat"), ("r1_exact_pair", "R@1 pair"),
            ("mean_cos_image", "mean cos")]
    say(f"{'test split':<30}" + "".join(f"{h:>9}" for _, h in keys) + f"{'val R@1':>9}")

    def line(label: str, t: dict[str, Any], val: Any) -> None:
        say(f"{label:<30}" + "".join(f"{fmt(t.get(k)):>9}" for k, _ in keys) + f"{fmt(val):>9}")

    line("base (before)", b, next(iter(runs.values()))["metrics"]["start"]["val/recall@1"])
    for name, run in runs.items():
        line(f"{name} best-val ckpt", run["test"], run["metrics"]["val"]["val/recall@1"])
        line(f"{name} last epoch", run["test_last"], run["metrics"]["last"]["val/recall@1"])
    line("chance", res["chance"], None)
    say(f"NMI: k-means on single-label test rows (condition: n={b['n_condition']}, "
        f"k={b['k_condition']}; category: n={b['n_category']}, k={b['k_category']}); "
        "R@1 cond / cat: image->text, any text of the same dominant condition / category "
        "counts; R@1 pair: only the row's own text; mean cos: mean pairwise cosine of the "
        "image embeddings; chance NMI: k-means on random vectors vs random labels")
    base = runs.get("sigmoid")
    if base is not None:
        for name, run in runs.items():
            if name == "sigmoid":
                continue
            for which in ("test", "test_last"):
                d = {k: run[which][k] - base[which][k] for k, _ in keys}
                res.setdefault("delta_vs_sigmoid", {}).setdefault(name, {})[which] = d
                say(f"{name} - sigmoid ({'best-val ckpt' if which == 'test' else 'last epoch'})"
                    ": " + ", ".join(f"{h} {d[k]:+.3f}" for k, h in keys[:-1]))
    return res


# ----------------------------------------------------------------------------- exp 2
def gradient_check(env: dict[str, Any], model_dir: str | Path, n: int = 32, chunk: int = 8
                   ) -> dict[str, Any]:
    """Parameter gradients of one 32-row batch: full 32x32 loss (reference), gradient caching
    over 4 chunks of 8, naive accumulation of four 8x8 losses. The rows are the first 32 of
    a random permutation of the train split (so conditions repeat as in training)."""
    from medsig.models.encoder import Encoder
    from medsig.train.data import RowImages
    from medsig.train.gradcache import gradcache_step, split_batch
    from medsig.train.losses import positives_from_labels, sigmoid_loss

    train = env["train"]
    enc = Encoder.load(model_dir, device="cpu")
    model = enc.model.float().train()
    ds = RowImages(train.image_paths, enc.preprocess)
    rows = np.random.default_rng(0).permutation(len(train))[:n].tolist()
    pixels = torch.stack([ds[i][1] for i in rows])
    all_texts = train.texts(random.Random(0))
    texts = [all_texts[i] for i in rows]
    tokens = enc.tokenize(texts)
    pos = positives_from_labels(None, "identical_text", texts=texts)

    def enc_i(px: torch.Tensor) -> torch.Tensor:
        return F.normalize(enc.image_features(px), dim=-1)

    def enc_t(tok: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(enc.text_features(tok["input_ids"], tok.get("attention_mask")),
                           dim=-1)

    def loss(i: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(i, t, logit_scale=model.logit_scale, logit_bias=model.logit_bias,
                            positives=p)

    params = [p for p in model.parameters() if p.requires_grad]

    def grads() -> torch.Tensor:
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in params]).clone()
        model.zero_grad(set_to_none=True)
        return g

    model.zero_grad(set_to_none=True)
    full_loss = loss(enc_i(pixels), enc_t(tokens), pos)
    full_loss.backward()
    g_full = grads()
    gc_loss = gradcache_step(enc_i, enc_t, list(pixels.split(chunk)),
                             split_batch(tokens, chunk), lambda i, t: loss(i, t, pos))
    g_gc = grads()
    block_losses = []
    tok_chunks = split_batch(tokens, chunk)
    for k, (px, tk) in enumerate(zip(pixels.split(chunk), tok_chunks)):
        s = slice(k * chunk, (k + 1) * chunk)
        lk = loss(enc_i(px), enc_t(tk), pos[s, s])
        (lk / len(tok_chunks)).backward()
        block_losses.append(lk.item())
    g_naive = grads()

    def rel(a: torch.Tensor) -> float:
        return float((a - g_full).norm() / g_full.norm())

    # the same comparison without logit_scale / logit_bias (the two towers' weights only)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keep = torch.cat([torch.full((p.numel(),), "logit_" not in n, dtype=torch.bool)
                      for n, p in zip(names, params)])
    return {"full_loss_32x32": full_loss.item(), "gradcache_loss": gc_loss.item(),
            "naive_mean_loss_8x8": float(np.mean(block_losses)),
            "gradcache_rel_grad_diff": rel(g_gc), "naive_rel_grad_diff": rel(g_naive),
            "gradcache_cosine": float(F.cosine_similarity(g_gc, g_full, dim=0)),
            "naive_cosine": float(F.cosine_similarity(g_naive, g_full, dim=0)),
            "naive_cosine_towers": float(F.cosine_similarity(g_naive[keep], g_full[keep],
                                                             dim=0)),
            "gradcache_cosine_towers": float(F.cosine_similarity(g_gc[keep], g_full[keep],
                                                                 dim=0))}


def exp_accum(args: argparse.Namespace, env: dict[str, Any], work: Path,
              ref: dict[str, Any] | None) -> dict[str, Any]:
    say("\n== 2. naive gradient accumulation vs gradient caching (effective batch 32) ==")
    res: dict[str, Any] = {"load_before": load()}
    texts = env["test"].texts(random.Random(args.seed))
    models = {"initial model": env["base"]}
    if ref is not None:
        models["after the batch-32 sigmoid run"] = ref["out"]
    res["gradient_check"] = {}
    for label, model_dir in models.items():
        res["gradient_check"][label] = gc = gradient_check(env, model_dir)
        say(f"one batch of 32, {label}: loss 32x32 {gc['full_loss_32x32']:.4f}, gradcache "
            f"{gc['gradcache_loss']:.4f}, naive mean of four 8x8 {gc['naive_mean_loss_8x8']:.4f}")
        say(f"  parameter gradient vs the 32x32 loss's: gradcache rel. diff "
            f"{gc['gradcache_rel_grad_diff']:.1e} (cos {gc['gradcache_cosine']:.6f}); naive rel. "
            f"diff {gc['naive_rel_grad_diff']:.3f} (cos {gc['naive_cosine']:.4f}; towers only, "
            f"without logit scale / bias: cos {gc['naive_cosine_towers']:.4f})")
    variants = {
        "naive_4x8": {"optim": {"batch_size": 8, "grad_accum": 4}},
        "gradcache_4x8": {"optim": {"batch_size": 8, "grad_accum": 4, "gradcache": True}},
    }
    runs: dict[str, Any] = {}
    if ref is not None:
        runs["plain_1x32"] = ref
    for name, over in variants.items():
        runs[name] = run = train_and_test(args, env, work, name, over, texts)
        say(f"  trained {name}: {run['steps']} steps in {run['wall_s']:.1f} s")
    seen = {"plain_1x32": (1, 32), "naive_4x8": (4, 8), "gradcache_4x8": (1, 32)}
    say(f"{'run':<15}{'loss blocks':>12}{'neg/img':>8}{'best val':>9}{'last val':>9}"
        f"{'last val':>9}{'test':>8}{'test':>8}{'test':>8}{'s/step':>8}{'img/s':>7}")
    say(f"{'':<35}{'R@1':>9}{'R@1':>9}{'NMI':>9}{'R@1c':>8}{'R@1cat':>8}{'NMIcat':>8}")
    for name, run in runs.items():
        blocks, size = seen[name]
        run["loss_seen"] = {"blocks": blocks, "block": f"{size}x{size}",
                            "pairs_per_step": blocks * size * size,
                            "negatives_per_image": size - 1}
        v, last, t = run["metrics"]["val"], run["metrics"]["last"], run["test_last"]
        say(f"{name:<15}{f'{blocks} x {size}x{size}':>12}{size - 1:>8}"
            f"{fmt(v['val/recall@1']):>9}{fmt(last['val/recall@1']):>9}"
            f"{fmt(last.get('val/nmi')):>9}{fmt(t['r1_condition']):>8}"
            f"{fmt(t['r1_category']):>8}{fmt(t['nmi_category']):>8}"
            f"{run['step_s_median']:>8.3f}{32 / run['step_s_median']:>7.1f}")
    say("test = last-epoch weights; s/step = median time between optimizer steps")
    if "naive_4x8" in runs and "gradcache_4x8" in runs:
        res["gradcache_time_ratio"] = (runs["gradcache_4x8"]["step_s_median"]
                                       / runs["naive_4x8"]["step_s_median"])
        say(f"gradcache / naive time per step: {res['gradcache_time_ratio']:.2f}x "
            "(gradient caching encodes every chunk twice)")
    res["runs"] = {k: v for k, v in runs.items() if k != "plain_1x32"}
    res["reference"] = "plain_1x32 is the 'sigmoid' run of experiment 1"
    res["load_after"] = load()
    return res


# ----------------------------------------------------------------------------- exp 3
def _status_kb(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def mem_worker(args: argparse.Namespace) -> None:
    """One forward + backward of the loss; peak RSS above the pre-run RSS, and the profiler."""
    from medsig.train.losses import get_loss, loss_peak_memory

    n, d = args.pairs, args.dim
    chunk = None if args.chunk == 0 else args.chunk
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    fn = get_loss(args.loss)
    fn(img[:64], txt[:64], logit_scale=scale, logit_bias=bias, chunk_size=chunk).backward()
    for t in (img, txt, scale, bias):
        t.grad = None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
        how = "VmHWM"
    except OSError:
        how = "ru_maxrss"
    import resource

    before = _status_kb("VmRSS")
    t = time.perf_counter()
    value = fn(img, txt, logit_scale=scale, logit_bias=bias, chunk_size=chunk)
    value.backward()
    elapsed = time.perf_counter() - t
    peak = _status_kb("VmHWM") if how == "VmHWM" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"loss": float(value), "grad_img_sum": float(img.grad.double().abs().sum()),
           "grad_scale": float(scale.grad), "time_s": elapsed,
           "peak_rss_mb": (peak - before) / 1024, "rss_method": how}
    del value
    for x in (img, txt, scale, bias):
        x.grad = None
    out["profiler_peak_mb"] = loss_peak_memory(n, d, chunk, args.loss) / 2**20
    print(json.dumps(out))


def _mem_run(args: argparse.Namespace, loss: str, chunk: int, mmap: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--mem-worker", "--loss", loss, "--chunk", str(chunk),
           "--pairs", str(args.pairs), "--dim", str(args.dim)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if mmap:  # every block > 128 KiB is mmap-ed and unmapped on free: RSS = live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exp_memory(args: argparse.Namespace) -> dict[str, Any]:
    say(f"\n== 3. peak memory of one loss forward + backward, {args.pairs:,} pairs, "
        f"d={args.dim} ==")
    res: dict[str, Any] = {"pairs": args.pairs, "dim": args.dim, "load_before": load(),
                           "runs": {}}
    inputs_mb = 2 * args.pairs * args.dim * 4 / 2**20
    matrix_mb = args.pairs * args.pairs * 4 / 2**20
    say(f"inputs (2 x n x d fp32) {inputs_mb:.0f} MB; one n x n fp32 matrix {matrix_mb:.0f} MB;"
        " peak RSS above the RSS before the call (own subprocess each)")
    say(f"{'loss':<9}{'chunk':>7}{'RSS MB':>9}{'RSS MB':>9}{'profiler':>10}{'time s':>8}"
        f"{'loss value':>13}{'|diff|':>10}{'grad diff':>11}")
    say(f"{'':<16}{'glibc':>9}{'mmap':>9}{'MB':>10}")
    for loss in ("sigmoid", "softmax"):
        ref = None
        for chunk in args.chunks:
            key = f"{loss}/{'none' if chunk == 0 else chunk}"
            r = _mem_run(args, loss, chunk, mmap=False)
            m = _mem_run(args, loss, chunk, mmap=True)
            if "error" in r or "error" in m:
                res["runs"][key] = {"error": r.get("error") or m.get("error")}
                say(f"{loss:<9}{chunk or 'none':>7}  error: {res['runs'][key]['error']}")
                continue
            r["peak_rss_mb_mmap"] = m["peak_rss_mb"]
            r["time_s_mmap"] = m["time_s"]
            ref = ref or r
            r["abs_loss_diff_vs_unchunked"] = abs(r["loss"] - ref["loss"])
            r["rel_grad_sum_diff_vs_unchunked"] = (abs(r["grad_img_sum"] - ref["grad_img_sum"])
                                                   / max(ref["grad_img_sum"], 1e-30))
            res["runs"][key] = r
            say(f"{loss:<9}{chunk or 'none':>7}{r['peak_rss_mb']:>9.0f}"
                f"{r['peak_rss_mb_mmap']:>9.0f}{r['profiler_peak_mb']:>10.0f}"
                f"{r['time_s']:>8.2f}{r['loss']:>13.6f}{r['abs_loss_diff_vs_unchunked']:>10.1e}"
                f"{r['rel_grad_sum_diff_vs_unchunked']:>11.1e}")
        full = res["runs"].get(f"{loss}/none")
        for chunk in args.chunks:
            r = res["runs"].get(f"{loss}/{chunk}")
            if not (chunk and full and r) or "error" in r or "error" in full:
                continue
            x = {"rss_glibc": full["peak_rss_mb"] / max(r["peak_rss_mb"], 1),
                 "rss_mmap": full["peak_rss_mb_mmap"] / max(r["peak_rss_mb_mmap"], 1),
                 "profiler": full["profiler_peak_mb"] / max(r["profiler_peak_mb"], 1e-9),
                 "time": r["time_s"] / full["time_s"]}
            r["vs_unchunked"] = x
            say(f"  {loss} chunk {chunk}: {x['rss_glibc']:.1f}x less peak RSS (glibc), "
                f"{x['rss_mmap']:.1f}x (mmap), {x['profiler']:.1f}x less allocated (profiler); "
                f"{x['time']:.2f}x the time")
    res["load_after"] = load()
    return res


# ----------------------------------------------------------------------------- exp 4
def raw_throughput(env: dict[str, Any], steps: int, warmup: int = 3) -> dict[str, float]:
    """Forward + backward + AdamW step of the same model, loss and batch size on ready
    tensors (real preprocessed images, pre-tokenised texts)."""
    from medsig.models.encoder import Encoder
    from medsig.train.data import RowImages
    from medsig.train.losses import positives_from_labels, sigmoid_loss

    train = env["train"]
    enc = Encoder.load(env["base"], device="cpu")
    model = enc.model.float().train()
    ds = RowImages(train.image_paths, enc.preprocess)
    pixels = torch.stack([ds[i][1] for i in range(32)])
    texts = train.texts(random.Random(0))[:32]
    tokens = enc.tokenize(texts)
    pos = positives_from_labels(None, "identical_text", texts=texts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        img = F.normalize(enc.image_features(pixels), dim=-1)
        txt = F.normalize(enc.text_features(tokens["input_ids"], tokens.get("attention_mask")),
                          dim=-1)
        loss = sigmoid_loss(img, txt, logit_scale=model.logit_scale,
                            logit_bias=model.logit_bias, positives=pos)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"step_s_median": med, "images_per_s": 32 / med, "steps": steps}


def data_time(env: dict[str, Any], batches: int = 4) -> dict[str, float]:
    """What the loop does per batch of 32 before the model runs (num_workers=0): decode,
    augment and preprocess 32 images, stack them, render and tokenise 32 texts."""
    from medsig.data.transforms import Augment
    from medsig.models.encoder import Encoder
    from medsig.train.data import RowImages

    train = env["train"]
    enc = Encoder.load(env["base"], device="cpu")
    ds = RowImages(train.image_paths, enc.preprocess, Augment(enc.image_size), 0)
    texts = train.texts(random.Random(0))
    images, tok = [], []
    for b in range(batches):
        rows = range(b * 32, (b + 1) * 32)
        t = time.perf_counter()
        torch.stack([ds[i][1] for i in rows])
        images.append(time.perf_counter() - t)
        t = time.perf_counter()
        enc.tokenize([texts[i] for i in rows])
        tok.append(time.perf_counter() - t)
    return {"images_s_per_batch": float(np.median(images)),
            "tokenize_s_per_batch": float(np.median(tok))}


def exp_throughput(args: argparse.Namespace, env: dict[str, Any], work: Path) -> dict[str, Any]:
    say("\n== 4. training step throughput: medsig loop vs raw step (batch 32) ==")
    res: dict[str, Any] = {"load_before": load(), "rounds": []}
    # the first three at the bench's torch threads (those of the raw step); the last with
    # medsig's defaults: one loader process per spare core, torch threads = cores left.
    # Rounds of raw, loops, raw: each loop is compared with the raw steps around it (this
    # machine's speed drifts by +-30 % over minutes), the median ratio over rounds reported
    variants = (("loop_serial", {"prefetch": 0}), ("loop_workers0", {}),
                ("loop_workers1", {"num_workers": 1}),
                ("loop_defaults", {"num_workers": None, "threads": None}))
    raw = raw_throughput(env, args.raw_steps)["images_per_s"]
    for r in range(args.rounds):
        loops: dict[str, Any] = {}
        for name, over in variants:
            cfg = config(args, env, work / "runs" / f"throughput_{name}_{r}",
                         optim={"max_steps": args.loop_steps},
                         eval={"at_start": False, "eval_every": 1000})
            cfg.update(over)
            run = timed_train(cfg, work / "logs" / f"throughput_{name}_{r}.log")
            run.pop("metrics", None)
            run["images_per_s"] = 32 / run["step_s_median"]
            loops[name] = run
        after = raw_throughput(env, args.raw_steps)["images_per_s"]
        ref = (raw + after) / 2
        for run in loops.values():
            run["ratio_vs_raw"] = run["images_per_s"] / ref
        res["rounds"].append({"raw_images_per_s": ref, "raw_before": raw, "raw_after": after,
                              "load": load(), "loops": loops})
        say(f"round {r + 1}: raw step {ref:.1f} img/s ({raw:.0f} before, {after:.0f} after); "
            + "; ".join(f"{n} {run['images_per_s']:.1f} img/s = {run['ratio_vs_raw']:.2f}"
                        for n, run in loops.items()))
        raw = after
    res["data"] = data = data_time(env)
    say(f"data per batch of 32 (in the loop's process when num_workers=0): images "
        f"{data['images_s_per_batch'] * 1000:.0f} ms (decode + augment + preprocess), "
        f"tokenise {data['tokenize_s_per_batch'] * 1000:.1f} ms")
    res["median_ratio"] = {}
    for name, _ in variants:
        ratios = [rd["loops"][name]["ratio_vs_raw"] for rd in res["rounds"]]
        med = float(np.median(ratios))
        res["median_ratio"][name] = med
        say(f"medsig {name}: ratio to the raw step, median of {len(ratios)} round(s) "
            f"{med:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) -> "
            f"{'meets' if med >= 0.85 else 'below'} the 0.85 goal")
    res["load_after"] = load()
    return res


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (~1.5 min)")
    p.add_argument("--n", type=int, default=None, help="generated derm images (default 1000)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 8)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1; 0 = torch's default). On a shared "
                        "2-core machine two OpenMP threads stall whenever another process "
                        "takes a core (steps measured 60x slower); one thread degrades gently")
    p.add_argument("--pairs", type=int, default=4096,
                   help="experiment 3: pairs in the loss (--quick: 2048)")
    p.add_argument("--dim", type=int, default=768, help="experiment 3: embedding dim")
    p.add_argument("--chunks", default=None, help="experiment 3: chunk sizes, 0 = unchunked")
    p.add_argument("--experiments", default="1,2,3,4")
    p.add_argument("--work", default=None, help="keep data / runs here (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    p.add_argument("--mem-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss", default="sigmoid", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.mem_worker:
        mem_worker(args)
        return
    args.n = args.n or (400 if args.quick else 1000)
    args.epochs = args.epochs or (2 if args.quick else 8)
    args.chunks = [int(c) for c in (args.chunks or ("0,512" if args.quick else "0,1024,256"))
                   .split(",")]
    if args.quick and args.pairs == 4096:
        args.pairs = 2048
    args.loop_steps = 12 if args.quick else 30
    args.raw_steps = 8 if args.quick else 15
    args.rounds = 1 if args.quick else 3
    todo = {int(x) for x in args.experiments.split(",")}
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medsig-bench-train-"))
    if args.work and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_start": load()},
        "settings": {"quick": args.quick, "n": args.n, "epochs": args.epochs, "lr": LR,
                     "batch": 32, "image_size": args.image_size, "seed": args.seed,
                     "model": "write_tiny siglip (hidden 64, 2 layers, patch 8)",
                     "text": "templates (random spec template per row and epoch)",
                     "pairs": args.pairs, "dim": args.dim, "chunks": args.chunks,
                     "loop_steps": args.loop_steps, "raw_steps": args.raw_steps},
    }
    say(f"medsig bench/train.py: {'quick' if args.quick else 'default'} run, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        f"load {results['machine']['load_start']}, work dir {work}")
    try:
        env = setup(args, work)
        env["train"] = env["collection"].select_split("train")
        env["test"] = env["collection"].select_split("test")
        results["settings"]["split"] = env["counts"]
        say(f"data: derm n={args.n} ({env['counts']}), tiny SigLIP; set-up "
            f"{env['seconds']:.1f} s")
        ref = None
        if 1 in todo:
            results["losses"] = exp_losses(args, env, work)
            ref = results["losses"]["runs"].get("sigmoid")
            save(results, out)
        if 2 in todo:
            results["accumulation"] = exp_accum(args, env, work, ref)
            save(results, out)
        if 3 in todo:
            results["memory"] = exp_memory(args)
            save(results, out)
        if 4 in todo:
            results["throughput"] = exp_throughput(args, env, work)
            save(results, out)
    finally:
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        results["machine"]["load_end"] = load()
        save(results, out)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    say(f"\ntotal {results['total_seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
