"""Benchmark: forgetting and its recovery by weight-space blending (WiSE-FT), on CPU.

All through medsig's API, tiny random-init SigLIP, generated data:

1. broad: the tiny model trained with classification heads (full fine-tune, the demo's
   random-start recipe: lr 1e-3, 25 epochs, no augmentation) on generated dermatology
   (`medsig data synth derm`: conditions, 16 coarse categories, urgency);
2. what it learned: k-means NMI of the image embeddings vs the coarse categories on the
   derm val and test splits, untouched random model vs broad (paired group bootstrap);
3. narrow: broad fine-tuned with new heads (full) on generated post-operative wounds;
   the same NMI, narrow vs broad: the forgetting;
4. the wound spec names `retention: {metric: clustering/nmi:category, spec: derm}`;
   `choose_alpha` blends broad and narrow at alpha 0, 0.1, ..., 1 (narrow's heads kept),
   evaluates each on the val splits (wound macro AUC, derm category NMI) and picks one;
5. the test splits: every alpha once more, for the record (the choice was made on val).

Per alpha: in-domain gain kept (m(a) - m(0)) / (m(1) - m(0)), retention kept r(a) / r(0)
and drop recovered (r(a) - r(1)) / (r(0) - r(1)), each with a 95% interval over paired
group-bootstrap resamples (`alpha_table`).

    .venv/bin/python bench/blend.py [--quick] [--work DIR] [--out bench/results/blend.json]

Timings are wall-clock on a possibly shared machine (the JSON records the load average).
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
KEEP = 0.9


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


def train(spec: Path, model: Path | str, out: Path, epochs: int, lr: float, seed: int
          ) -> Path:
    from medsig.train import train as run

    cfg = {"spec": str(spec), "model": str(model), "out": str(out), "objective": "classify",
           "seed": seed, "num_workers": 0, "device": "cpu", "precision": "fp32",
           "data": {"augment": False},
           "optim": {"epochs": epochs, "batch_size": 32, "lr": lr, "warmup_ratio": 0.05}}
    return Path(run(cfg))


def ci(d: dict[str, Any] | None, digits: int = 3) -> str:
    if not d or d.get("point") is None:
        return "-"
    return f"{d['point']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def diff(p: dict[str, Any]) -> str:
    return f"{p['difference']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"


def flip(p: dict[str, Any]) -> dict[str, Any]:
    """A paired difference A - B as B - A."""
    return {**p, "difference": -p["difference"], "low": -p["high"], "high": -p["low"]}


def learned_and_forgot(derm: Path, models: dict[str, str], work: Path, n_boot: int
                       ) -> dict[str, Any]:
    """Category NMI on derm val and test: random vs broad (learned), narrow vs broad."""
    from medsig.evaluate.run import evaluate

    out: dict[str, Any] = {}
    for split in ("val", "test"):
        res = evaluate(derm, models, tasks=["clustering"], split=split,
                       out=work / f"derm-{split}", n_boot=n_boot, device="cpu",
                       num_workers=0, report=False, audit=False, duplicates=None,
                       purpose="bench")
        out[split] = {"nmi": res["headline"][RETENTION], "paired": res["paired"][RETENTION]}
    return out


def table(rows: list[dict[str, Any]], split: str) -> None:
    from medsig.evaluate.retention import ratio_text

    say(f"\n{split}: {'alpha':>5}  {'wound macro AUC':>22}  {'gain kept':>15}  "
        f"{'derm category NMI':>22}  {'retained':>15}  {'drop recovered':>16}")
    for r in rows:
        say(f"{'':>{len(split) + 2}}{r['alpha']:>5.1f}  {ci(r['in_domain']):>22}  "
            f"{ratio_text(r['gain_kept'], r['gain_kept_ci']):>15}  {ci(r['retention']):>22}  "
            f"{ratio_text(r['retained'], r['retained_ci']):>15}  "
            f"{ratio_text(r['drop_recovered'], r['drop_recovered_ci']):>16}")


def meets(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Alphas (0 < a < 1) keeping >= 90 % of the gain and >= 90 % of ``key``."""
    return [r["alpha"] for r in rows if 0 < r["alpha"] < 1
            and r["gain_kept"] >= KEEP and r[key] >= KEEP]


def test_rows(wound: Path, blends: Path, alphas: list[float], work: Path, n_boot: int
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every alpha on the test splits (after the choice on val), with the ratio intervals."""
    from medsig.evaluate.retention import alpha_table
    from medsig.evaluate.run import evaluate
    from medsig.models.blend import alpha_name

    models = {alpha_name(a): str(blends / alpha_name(a)) for a in alphas}
    res = evaluate(wound, models, tasks=["classification"], split="test", out=work / "test",
                   n_boot=n_boot, device="cpu", num_workers=0, report=False, audit=False,
                   duplicates=None, replicates=True, purpose="bench")
    rows = alpha_table(res["headline"][IN_DOMAIN], res["retention"]["models"],
                       {alpha_name(a): a for a in alphas})
    return rows, {"in_domain": res["paired"][IN_DOMAIN],
                  "retention": res["retention"]["paired"]}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer epochs")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blend.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--broad-epochs", type=int, default=None, help="default 25 (quick: 8)")
    ap.add_argument("--broad-lr", type=float, default=1e-3)
    ap.add_argument("--narrow-epochs", type=int, default=None, help="default 20 (quick: 6)")
    ap.add_argument("--narrow-lr", type=float, default=1e-3)
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args()
    args.broad_epochs = args.broad_epochs or (8 if args.quick else 25)
    args.narrow_epochs = args.narrow_epochs or (6 if args.quick else 20)
    args.n_derm, args.n_wound = (400, 300) if args.quick else (1000, 600)
    return args


def stages(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, str]]:
    """Data, the random tiny model, broad and narrow: (derm, wound, {name: folder})."""
    from medsig.models.tiny import write_tiny

    logs = work / "logs"
    t = time.perf_counter()
    with quiet(logs / "setup.log"):
        derm = data("derm", work, args.n_derm, args.seed, args.size)
        wound = data("wound", work, args.n_wound, args.seed, args.size)
        random = write_tiny(work / "random", arch="siglip", image_size=args.size,
                            seed=args.seed)
    raw = yaml.safe_load(wound.read_text())
    raw["retention"] = {"metric": RETENTION, "spec": os.path.relpath(derm, wound.parent)}
    wound.write_text(yaml.safe_dump(raw, sort_keys=False))
    say(f"data (derm {args.n_derm}, wound {args.n_wound}, {args.size} px) + tiny model: "
        f"{time.perf_counter() - t:.1f} s ({work})")
    broad = stage("broad", "derm classification heads", derm, random, work, logs,
                  args.broad_epochs, args.broad_lr, args.seed)
    narrow = stage("narrow", "wound heads on broad", wound, broad, work, logs,
                   args.narrow_epochs, args.narrow_lr, args.seed)
    return derm, wound, {"random": str(random), "broad": str(broad), "narrow": str(narrow)}


def stage(name: str, what: str, spec: Path, start: Path, work: Path, logs: Path,
          epochs: int, lr: float, seed: int) -> Path:
    """One timed training stage (its log in ``logs``): the model folder ``work / name``."""
    t = time.perf_counter()
    with quiet(logs / f"{name}.log"):
        out = train(spec, start, work / name, epochs, lr, seed)
    say(f"{name}: {what}, {epochs} epochs, lr {lr:g}: {time.perf_counter() - t:.1f} s")
    return out


def training_metrics(folder: str) -> dict[str, Any]:
    m = json.loads((Path(folder) / "medsig.json").read_text())["metrics"]
    return {"start": (m.get("start") or {}).get("val/macro_auc"),
            "best": (m.get("val") or {}).get("val/macro_auc"),
            "best_epoch": (m.get("val") or {}).get("epoch")}


def main() -> None:
    args = parse()
    work = args.work or Path(tempfile.mkdtemp(prefix="medsig-blend-"))
    from medsig.evaluate.blending import choose_alpha

    t0 = time.perf_counter()
    derm, wound, folders = stages(args, work)
    t = time.perf_counter()
    with quiet(work / "logs" / "derm.log"):
        derm_nmi = learned_and_forgot(derm, {"broad": folders["broad"],
                                             "random": folders["random"],
                                             "narrow": folders["narrow"]}, work, args.n_boot)
    say(f"derm category NMI of random / broad / narrow: {time.perf_counter() - t:.1f} s")
    for split, r in derm_nmi.items():
        say(f"  {split}: random {ci(r['nmi']['random'])}, broad {ci(r['nmi']['broad'])}, "
            f"narrow {ci(r['nmi']['narrow'])}; broad - random "
            f"{diff(flip(r['paired']['random']))}, narrow - broad {diff(r['paired']['narrow'])}")
    alphas = [round(0.1 * i, 1) for i in range(11)]
    t = time.perf_counter()
    with quiet(work / "logs" / "select.log"):
        sel = choose_alpha(wound, folders["broad"], folders["narrow"], alphas, work / "blends",
                           IN_DOMAIN, "val", n_boot=args.n_boot, device="cpu", num_workers=0)
    say(f"blend + val evaluation of {len(alphas)} alphas: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    with quiet(work / "logs" / "test.log"):
        rows, paired = test_rows(wound, work / "blends", alphas, work, args.n_boot)
    say(f"test evaluation of {len(alphas)} alphas: {time.perf_counter() - t:.1f} s")
    table(sel["rows"], "val")
    table(rows, "test")
    summary = report(sel, rows, paired)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "work": str(work),
           "training": {k: training_metrics(v) for k, v in folders.items() if k != "random"},
           "derm_category_nmi": derm_nmi, "selection": sel, "test": {"rows": rows, **paired},
           "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
           "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from medsig.models.artifact import clean_json

    args.out.write_text(json.dumps(clean_json(out), indent=1) + "\n")
    say(f"\nwrote {args.out}; total {out['seconds']} s (load {os.getloadavg()[0]:.1f})")


def report(sel: dict[str, Any], rows: list[dict[str, Any]], paired: dict[str, Any]
           ) -> dict[str, Any]:
    """What the run shows: the choice on val, and which alphas meet both 90 % targets."""
    from medsig.evaluate.retention import ratio_text

    pick = sel["choice"]
    last = "alpha-1.00"
    drop_val = sel["retention"]["paired"].get(last, {})
    drop_test = paired["retention"].get(last, {})
    gain_test = paired["in_domain"].get(last, {})
    summary = {"chosen_on_val": pick,
               "val_meets_retained": meets(sel["rows"], "retained"),
               "val_meets_drop_recovered": meets(sel["rows"], "drop_recovered"),
               "test_meets_retained": meets(rows, "retained"),
               "test_meets_drop_recovered": meets(rows, "drop_recovered"),
               "test_narrow_minus_broad": {"in_domain": gain_test, "retention": drop_test}}
    say(f"\nnarrow - broad (alpha 1 - alpha 0): val NMI {diff(drop_val)}; test NMI "
        f"{diff(drop_test)}; test wound macro AUC {diff(gain_test)}")
    say(f"chosen on val: alpha {pick['alpha']} (>= 90 % gain and >= 90 % retained on val: "
        f"{pick['meets']})")
    chosen = next((r for r in rows if r["alpha"] == pick["alpha"]), None)
    if chosen is not None:
        say(f"  on test: gain kept {ratio_text(chosen['gain_kept'], chosen['gain_kept_ci'])}, "
            f"retained {ratio_text(chosen['retained'], chosen['retained_ci'])}, drop recovered "
            f"{ratio_text(chosen['drop_recovered'], chosen['drop_recovered_ci'])}")
    for split, r in (("val", sel["rows"]), ("test", rows)):
        say(f"{split}: alphas with >= 90 % gain and >= 90 % retained: "
            f"{meets(r, 'retained') or 'none'}; with >= 90 % of the drop recovered: "
            f"{meets(r, 'drop_recovered') or 'none'}")
    return summary


if __name__ == "__main__":
    main()
