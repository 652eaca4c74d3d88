"""Benchmark: forgetting and weight-space blending (WiSE-FT) with medsig, on CPU.

1. broad: a tiny random SigLIP vision tower trained by medsig (classification heads, full
   fine-tune) on generated dermatology data (conditions, coarse categories, urgency);
2. narrow: that model fine-tuned (new classification heads, full) on generated
   post-operative wounds;
3. retention: the wound spec names `clustering/nmi:category` on the dermatology data
   (k-means of the image embeddings vs the coarse categories);
4. `choose_alpha` blends broad and narrow at alphas 0..1 (the narrow heads kept), evaluates
   each on the *val* splits (wound macro AUC, dermatology category NMI) and picks one;
5. the test splits, once: broad (alpha 0), the chosen alpha and the fine-tune (alpha 1),
   with 95% group-bootstrap intervals and paired differences.

    .venv/bin/python bench/blend.py [--quick] [--work DIR] [--out bench/results/blend.json]

Timings are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IN_DOMAIN = "classification/macro_auc"
RETENTION = "clustering/nmi:category"


def say(msg: str = "") -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def quiet(log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def data(kind: str, work: Path, n: int, seed: int, size: int) -> Path:
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize

    spec = synthesize(kind, work / kind, n=n, seed=seed, image_size=size)
    col = load_collection(spec)
    splits, _ = write_split(col, split_collection(col, seed=seed), spec.parent)
    set_spec_splits(spec, splits.name)
    return spec


def train(spec: Path, model: Path | str, out: Path, args: argparse.Namespace,
          lr: float | None = None) -> Path:
    from medsig.train import train as run

    cfg = {"spec": str(spec), "model": str(model), "out": str(out), "objective": "classify",
           "seed": args.seed, "num_workers": 0, "device": "cpu", "precision": "fp32",
           "optim": {"epochs": args.epochs, "batch_size": 32, "lr": lr or args.lr}}
    return Path(run(cfg))


def ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("point") is None:
        return "-"
    return f"{d['point']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer epochs")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blend.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--narrow-lr", type=float, default=None, help="default: --lr")
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 12)
    n_derm, n_wound, size = (300, 240, 48) if args.quick else (900, 600, 64)
    work = args.work or Path(tempfile.mkdtemp(prefix="medsig-blend-"))
    logs = work / "logs"
    from medsig.evaluate.blending import choose_alpha
    from medsig.evaluate.run import evaluate
    from medsig.models.blend import alpha_name
    from medsig.models.tiny import write_tiny

    t0 = time.perf_counter()
    with quiet(logs / "setup.log"):
        derm = data("derm", work, n_derm, args.seed, size)
        wound = data("wound", work, n_wound, args.seed, size)
        base = write_tiny(work / "random", arch="siglip", image_size=size, seed=args.seed)
    raw = yaml.safe_load(wound.read_text())
    raw["retention"] = {"metric": RETENTION, "spec": os.path.relpath(derm, wound.parent)}
    wound.write_text(yaml.safe_dump(raw, sort_keys=False))
    say(f"data + tiny model: {time.perf_counter() - t0:.1f} s ({work})")
    t = time.perf_counter()
    with quiet(logs / "broad.log"):
        broad = train(derm, base, work / "broad", args)
    say(f"broad training (derm, classification heads): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    with quiet(logs / "narrow.log"):
        narrow = train(wound, broad, work / "narrow", args, args.narrow_lr)
    say(f"narrow fine-tune (wounds, new heads, full): {time.perf_counter() - t:.1f} s")
    alphas = [round(0.1 * i, 1) for i in range(11)]
    t = time.perf_counter()
    with quiet(logs / "select.log"):
        sel = choose_alpha(wound, str(broad), str(narrow), alphas, work / "blends", IN_DOMAIN,
                           "val", n_boot=200, device="cpu", num_workers=0)
    say(f"blend + val selection over {len(alphas)} alphas: {time.perf_counter() - t:.1f} s")
    say(f"\n{'alpha':>5}  {'val ' + IN_DOMAIN:>28}  {'gain kept':>9}  "
        f"{'val ' + RETENTION:>30}  {'retained':>8}  {'drop recovered':>14}")
    for r in sel["rows"]:
        say(f"{r['alpha']:>5.1f}  {ci(r['in_domain']):>28}  {r['gain_kept']:>9.2f}  "
            f"{ci(r['retention']):>30}  {r['retained']:>8.2f}  {r['drop_recovered']:>14.2f}")
    pick = sel["choice"]
    say(f"chosen on val: alpha {pick['alpha']} (meets both 90 % targets: {pick['meets']})")
    chosen = pick["alpha"] if pick["alpha"] is not None else 1.0
    models = {"broad": str(work / "blends" / alpha_name(0.0))}
    if chosen not in (0.0, 1.0):
        models[f"blend{chosen:.1f}"] = str(work / "blends" / alpha_name(chosen))
    models["narrow"] = str(work / "blends" / alpha_name(1.0))
    t = time.perf_counter()
    with quiet(logs / "test.log"):
        res = evaluate(wound, models, tasks=["classification"], split="test",
                       out=work / "test", n_boot=args.n_boot, device="cpu", num_workers=0,
                       duplicates=None)
    say(f"test evaluation: {time.perf_counter() - t:.1f} s\n")
    head, ret = res["headline"][IN_DOMAIN], res["retention"]
    say(f"{'model':>10}  {'test ' + IN_DOMAIN:>28}  {'test ' + RETENTION:>30}")
    for m in models:
        say(f"{m:>10}  {ci(head[m]):>28}  {ci(ret['models'][m]):>30}")
    for m in list(models)[1:]:
        p_in, p_ret = res["paired"][IN_DOMAIN][m], ret["paired"][m]
        say(f"{m} - broad: {IN_DOMAIN} {p_in['difference']:+.3f} [{p_in['low']:+.3f}, "
            f"{p_in['high']:+.3f}]; {RETENTION} {p_ret['difference']:+.3f} "
            f"[{p_ret['low']:+.3f}, {p_ret['high']:+.3f}]")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "work": str(work),
           "selection": sel, "test": {"headline": head, "paired": res["paired"][IN_DOMAIN],
                                      "retention": ret},
           "seconds": round(time.perf_counter() - t0, 1), "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    say(f"\nwrote {args.out}; total {out['seconds']} s")


if __name__ == "__main__":
    main()
