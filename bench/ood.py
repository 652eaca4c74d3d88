"""Benchmark: the OOD gate of a wound model shown images of kinds it never saw.

Trains a wound model on generated wounds (tiny random SigLIP + probe by default, or
``--objective classify``), which fits the gate (two channels: Mahalanobis distance to the
train embeddings and to the train images' statistics, p-values against val combined,
threshold at 5 % false rejects on val). Then scores the wound test split (in-distribution)
against held-out kinds: generated derm and radiology images, the real chest X-rays of
``../shared/data/covid-cxr`` (when present), noise, blank and near-blank images and
screenshots of text. Prints AUROC per kind (goal >= 0.95) for the gate and for each channel
alone, the share of each kind the gate refuses, and the false-reject rate on the wound test
split; writes bench/results/ood.json.

    .venv/bin/python bench/ood.py [--n 400] [--size 64] [--objective probe|classify]
        [--seed 0] [--out F]

``--seed`` draws other generated wounds (and held-out images, seed + 1) to check that a
choice made on one draw holds on others; the default reproduces bench/results/ood.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsig.data.images import load_image
from medsig.data.outliers import KINDS, outlier_images
from medsig.metrics.classification import roc_auc
from medsig.models.ood import is_blank

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-cxr"


def train_wound_model(root: Path, n: int, size: int, objective: str, epochs: int,
                      seed: int = 0) -> Path:
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    tiny = write_tiny(root / "tiny", arch="siglip", image_size=size, seed=0)
    spec = synthesize("wound", root / "wound", n=n, seed=seed, image_size=size)
    if objective == "probe":
        from medsig.train.probe import train_probe

        return train_probe(spec, tiny, root / "model")
    from medsig.data.split import split_spec
    from medsig.train import train

    split_spec(spec, seed=0, duplicates=0)  # the same seeded split the probe makes itself
    return train({"spec": str(spec), "model": str(tiny), "out": str(root / "model"),
                  "objective": "classify", "device": "cpu", "precision": "fp32",
                  "optim": {"epochs": epochs, "batch_size": 16, "lr": 3e-3}})


def _scores(predictor, images) -> dict[str, np.ndarray]:
    """Raw channel scores (channel -> (n,)) of PIL images, as /v1/predict computes them."""
    import torch

    from medsig.models.ood import pixel_scores

    parts: dict[str, list] = {}
    for s in range(0, len(images), 64):
        px = torch.stack([predictor.preprocess(im) for im in images[s:s + 64]])
        for c, v in pixel_scores(predictor.safety.ood, predictor, px).items():
            parts.setdefault(c, []).append(v)
    return {c: np.concatenate(v) for c, v in parts.items()}


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return roc_auc(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


def _auroc_ci(s_in: np.ndarray, s_out: np.ndarray) -> list[float]:
    """95 % percentile-bootstrap interval of the AUROC (1000 resamples of both sets)."""
    from medsig.evaluate.bootstrap import bootstrap_ci

    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    r = bootstrap_ci(roc_auc, y, np.r_[s_in, s_out], n_boot=1000, seed=0)
    return [round(r.low, 4), round(r.high, 4)]


def held_out(root: Path, n: int, size: int, seed: int = 1) -> dict[str, list]:
    from medsig.data.collection import load_collection
    from medsig.data.synth import synthesize

    kinds: dict[str, list] = {}
    for kind in ("derm", "radiology"):
        col = load_collection(synthesize(kind, root / kind, n=n, seed=seed, image_size=size))
        kinds[f"generated {kind}"] = [load_image(p) for p in col.image_paths]
    if SHARED.is_dir():
        kinds["real chest X-rays"] = [load_image(p) for p in
                                      sorted((SHARED / "images").glob("*"))[:n]]
    for kind in KINDS:
        kinds[kind.replace("_", "-")] = outlier_images(kind, n, size=max(size, 96), seed=seed)
    return kinds


def _kind_row(predictor: Any, raw_in: dict[str, np.ndarray], images: list) -> dict[str, Any]:
    """AUROC (with its interval, and per channel) and refusal shares of one held-out kind
    against the wound test split's raw channel scores ``raw_in``."""
    gate = predictor.safety.ood
    raw_out = _scores(predictor, images)
    s_in, s_out = gate.combined(raw_in), gate.combined(raw_out)
    served = gate.flag(s_out) | np.array([is_blank(im) for im in images])
    return {"n": len(images), "auroc": _auroc(s_in, s_out), "auroc_ci95": _auroc_ci(s_in, s_out),
            "channels": {c: _auroc(raw_in[c], raw_out[c]) for c in raw_out},
            "refused": float(gate.flag(s_out).mean()), "served_refused": float(served.mean())}


def print_rows(rows: dict[str, dict[str, Any]], names: list[str]) -> None:
    print(f"{'held-out kind':<22}{'n':>5}{'AUROC':>8}{'95% CI':>14}{'refused':>9}{'served':>8}"
          + "".join(f"{c:>13}" for c in names) + "  goal AUROC >= 0.95")
    for kind, r in rows.items():
        ok = "ok" if r["auroc"] >= 0.95 else "BELOW GOAL"
        ci = "{:.3f}-{:.3f}".format(*r["auroc_ci95"])
        print(f"{kind:<22}{r['n']:>5}{r['auroc']:>8.3f}{ci:>14}{r['refused']:>9.2f}"
              f"{r['served_refused']:>8.2f}"
              + "".join(f"{r['channels'][c]:>13.3f}" for c in names) + f"  {ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="generated wounds")
    ap.add_argument("--n-ood", type=int, default=100, help="images per held-out kind")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--objective", choices=["probe", "classify"], default="probe")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="generated wounds' seed")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/ood.json)")
    args = ap.parse_args()
    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model = train_wound_model(root, args.n, args.size, args.objective, args.epochs,
                                  args.seed)
        trained = time.perf_counter() - start
        predictor = load_predictor(model)
        gate = predictor.safety.ood
        col = load_collection(root / "wound" / "spec.yaml")
        if col.split is None:  # the probe split the collection itself: the same seeded split
            from medsig.data.split import split_collection

            col = col.with_split(split_collection(col, seed=0).split)
        split = np.asarray(col.split)
        test = [load_image(p) for p, s in zip(col.image_paths, split) if s == "test"]
        raw_in = _scores(predictor, test)
        s_in = gate.combined(raw_in)
        frr = float(gate.flag(s_in).mean())
        frr_channels = {c: float((gate.log_p({c: v})[c] < np.log(gate.false_reject)).mean())
                        for c, v in raw_in.items()} if gate.needs_stats else {}
        rows = {kind: _kind_row(predictor, raw_in, images) for kind, images
                in held_out(root, args.n_ood, args.size, args.seed + 1).items()}
    print(f"wound model: tiny random SigLIP + {args.objective}, {args.n} generated wounds, "
          f"{args.size}px (trained in {trained:.0f} s on a shared, busy CPU)")
    print(f"gate: {gate.info()['method']}, threshold {gate.threshold:.4f} "
          f"(val false-reject target {gate.false_reject:.0%})")
    print(f"wound test split: n={len(s_in)}, false-reject rate {frr:.3f}"
          + "".join(f"; {c} alone at p < {gate.false_reject}: {v:.3f}"
                    for c, v in frr_channels.items()))
    print("refused: share above the gate's threshold; served: also refusing blank images "
          "(what /v1/predict does); AUROC per channel alone in the last columns")
    print_rows(rows, list(raw_in))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "ood.json"
    out.write_text(json.dumps({"args": vars(args), "false_reject_test": frr,
                               "n_test": len(s_in), "threshold": gate.threshold,
                               "gate": gate.info(), "false_reject_channels": frr_channels,
                               "kinds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
