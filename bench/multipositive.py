"""Experiment: standard vs multi-positive sigmoid, and gradient caching vs plain accumulation,
on a model that learns (generated dermatology data whose labels are visible).

Texts are a random spec template per row and epoch, so a batch holds several images of one
condition whose texts differ: the standard sigmoid loss pushes them apart, the
multi-positive one (positives: same condition) does not. Each comparison runs over 3 seeds
(the same data, split and tiny random SigLIP per seed) and is scored on the test split with
paired group-bootstrap intervals: image->text Recall@1 where any text of the same
(dominant) condition counts, and k-means NMI of the image embeddings by condition.

    .venv/bin/python bench/multipositive.py [--n 600] [--epochs 15] [--seeds 0 1 2]
                                            [--out bench/results/multipositive.json]

Timings are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "standard": {"contrastive": {"loss": "sigmoid"}},
    "multi_positive": {"contrastive": {"loss": "multi_positive_sigmoid",
                                       "positives": "same_class"}},
    "accumulation_8x4": {"contrastive": {"loss": "multi_positive_sigmoid",
                                         "positives": "same_class"},
                         "optim": {"batch_size": 8, "grad_accum": 4, "gradcache": False}},
    "gradcache_8x4": {"contrastive": {"loss": "multi_positive_sigmoid",
                                      "positives": "same_class"},
                      "optim": {"batch_size": 8, "grad_accum": 4, "gradcache": True}},
}
PAIRS = (("multi_positive", "standard"), ("gradcache_8x4", "accumulation_8x4"))


def prepare(work: Path, n: int) -> tuple[Path, Path]:
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    spec = synthesize("derm", work / "data", n=n, seed=0)
    col = load_collection(spec)
    path, _ = write_split(col, split_collection(col, seed=0), spec.parent)
    set_spec_splits(spec, path.name)
    return spec, write_tiny(work / "tiny", seed=0)


def test_outputs(folder: Path, spec: Path) -> dict[str, np.ndarray]:
    """Test-split image / text embeddings, dominant condition and case of each row."""
    from PIL import Image

    from medsig.data.collection import load_collection
    from medsig.evaluate.tasks import primary_class
    from medsig.models.encoder import Encoder

    col = load_collection(spec).select_split("test")
    enc = Encoder.load(folder, device="cpu")
    px = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in col.image_paths])
    with torch.no_grad():
        image = torch.cat([enc.embed_images(px[i:i + 64]) for i in range(0, len(px), 64)])
        text = enc.embed_texts(col.texts())
    return {"image": image.numpy(), "text": text.numpy(),
            "cls": primary_class(col, "condition"), "groups": np.asarray(col.groups)}


def _r1(image: np.ndarray, text: np.ndarray, cls: np.ndarray) -> np.ndarray:
    from medsig.metrics.retrieval import retrieval_ranks

    ranks = np.asarray(retrieval_ranks(image, text, cls)[0])
    return np.where(ranks > 0, (ranks == 1).astype(np.float64), np.nan)  # -1: no condition


def _nmi_fn(k: int, seed: int):
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    def fn(emb: np.ndarray, cls: np.ndarray) -> float:
        keep = cls >= 0
        clusters = KMeans(k, n_init=4, random_state=seed).fit_predict(emb[keep])
        return float(normalized_mutual_info_score(cls[keep], clusters))

    return fn


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    from medsig.evaluate.bootstrap import paired_bootstrap

    hits_a, hits_b = _r1(a["image"], a["text"], a["cls"]), _r1(b["image"], b["text"], b["cls"])
    r1 = paired_bootstrap(np.nanmean, (hits_a,), (hits_b,), groups=a["groups"], n_boot=1000,
                          seed=seed)
    k = len(set(a["cls"][a["cls"] >= 0].tolist()))
    nmi = paired_bootstrap(_nmi_fn(k, seed), (a["image"], a["cls"]), (b["image"], b["cls"]),
                           groups=a["groups"], n_boot=200, seed=seed)
    keep = ("a", "b", "difference", "low", "high", "significant")
    return {"recall@1_by_condition": {key: r1[key] for key in keep},
            "nmi_condition": {key: nmi[key] for key in keep}}


def main() -> None:
    from medsig.train import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multipositive.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medsig-mp-"))
    spec, base = prepare(work, args.n)
    results: dict[str, Any] = {"n": args.n, "epochs": args.epochs, "runs": {}, "pairs": {},
                               "load_before": os.getloadavg()}
    for seed in args.seeds:
        outputs = {}
        for name, extra in VARIANTS.items():
            start = time.perf_counter()
            cfg = {"spec": str(spec), "model": str(base), "out": str(work / f"{name}-{seed}"),
                   "objective": "contrastive", "seed": seed, "data": {"augment": False,
                                                                      "text": "templates"},
                   "contrastive": {"main_label": "condition"},
                   "optim": {"epochs": args.epochs, "batch_size": 32},
                   "eval": {"best_metric": "val/nmi"}}
            for key, value in extra.items():
                cfg[key] = {**cfg.get(key, {}), **value}
            folder = train(cfg)
            results["runs"][f"{name}-{seed}"] = {"seconds": round(time.perf_counter() - start, 1)}
            outputs[name] = test_outputs(folder, spec)
        for a, b in PAIRS:
            results["pairs"][f"{a} - {b}, seed {seed}"] = compare(outputs[a], outputs[b], seed)
            print(a, b, seed, json.dumps(results["pairs"][f"{a} - {b}, seed {seed}"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    results["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
