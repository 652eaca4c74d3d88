"""Benchmark: conformal coverage and calibration end to end on generated data.

Generates wound photos (enough for >= 500 test images), trains a tiny random SigLIP + probe
(which fits temperatures, conformal thresholds at alpha and the OOD gate on val), then
evaluates on the test split: per label the empirical coverage against 1 - alpha (goal
within +-0.03), abstention rate, mean set size, and ECE / Brier before -> after calibration.
Writes bench/results/conformal.json.

    .venv/bin/python bench/conformal.py [--n 3600] [--size 32] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3600)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.evaluate.run import evaluate
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        spec = synthesize("wound", root / "data", n=args.n, seed=0, image_size=args.size)
        col = load_collection(spec)
        splits, _ = write_split(col, split_collection(col, seed=0), spec.parent)
        set_spec_splits(spec, splits.name)
        tiny = write_tiny(root / "tiny", arch="siglip", image_size=args.size, seed=0)
        model = train_probe(spec, tiny, root / "probe", eval={"alpha": args.alpha})
        trained = time.perf_counter() - start
        metrics = evaluate(spec, {"probe": str(model)}, tasks=("classification",),
                           n_boot=50, report=False, duplicates=None)
    safe = metrics["safe_outputs"]["probe"]
    print(f"tiny random SigLIP + probe on {args.n} generated wounds ({args.size}px); "
          f"{metrics['n_rows']} test images; built and trained in {trained:.0f} s "
          "(shared, busy CPU)")
    print(f"{'label':<16}{'n':>5}{'target':>8}{'coverage':>10}{'|diff|':>8}{'abstain':>9}"
          f"{'set size':>9}   ECE before -> after   Brier before -> after")
    rows = {}
    for label, e in safe["labels"].items():
        c, b, a = e["conformal"], e["before"], e["after"]
        diff = abs(c["coverage"] - c["target"])
        rows[label] = {"conformal": c, "ece": [b["ece"], a["ece"]],
                       "brier": [b["brier"], a["brier"]]}
        ok = "ok" if diff <= 0.03 else "OUTSIDE +-0.03"
        print(f"{label:<16}{c['n']:>5}{c['target']:>8.2f}{c['coverage']:>10.3f}{diff:>8.3f}"
              f"{c['abstention']:>9.3f}{c['mean_set_size']:>9.2f}   "
              f"{b['ece']:.3f} -> {a['ece']:.3f}        {b['brier']:.3f} -> {a['brier']:.3f}"
              f"   {ok}")
    out = Path(__file__).parent / "results" / "conformal.json"
    out.write_text(json.dumps({"args": vars(args), "n_test": metrics["n_rows"],
                               "labels": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
