"""Benchmark on real data (`../shared/data`): does medsig learn, against what a user writes?

Part 1, PneumoniaMNIST (official train / val / test split, 28 px chest X-rays, normal vs
pneumonia), all from the same random start, all selected on val, all scored on test:

- medsig classify from scratch on a tiny random SigLIP with nothing but spec / model / out
  (the defaults of a random starting point);
- a logistic probe on the same random model's frozen embeddings;
- medsig contrastive fine-tuning on captions ("A chest X-ray showing pneumonia."), then
  zero-shot from the same prompts;
- a plain-PyTorch 3-layer CNN, the baseline a user would write (Adam, best val epoch).

Each: test ROC AUC with a 95 % bootstrap CI (images resampled), accuracy, sensitivity and
specificity at the threshold chosen on val (Youden's J), and wall time. Goal: medsig
classify >= the CNN's test AUC in <= 5 minutes.

Part 2, covid-cxr (113 real chest X-rays of 63 patients, `finding` with `todo` missing),
end to end: inspect, split by patient, embed into Qdrant, search by text and image, probe,
evaluate on the test split. A tiny random model: the run shows the pipeline on real files,
not a useful classifier.

    .venv/bin/python bench/real.py [--data ../shared/data] [--work DIR] [--cnn-epochs 20]
                                   [--contrastive-epochs N] [--reuse]
                                   [--out bench/results/real.json]

Timings are wall-clock on a possibly shared machine (the JSON records the load average).
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
SHARED = ROOT.parent / "shared" / "data"
SPLITS = ("train", "val", "test")

PNEUMONIA_SPEC = """
name: pneumoniamnist
table: metadata.csv
image_root: images
columns: {image: file, id: image_id, split: split}
templates: ["A chest X-ray showing {pneumonia}."]
labels:
  - {name: pneumonia, type: binary, column: label, positive: [pneumonia],
     negative: [normal], states: [no pneumonia, pneumonia]}
"""

COVID_SPEC = """
name: covid-cxr
table: {root}/metadata.csv
image_root: {root}/images
columns: {{image: filename, group: patientid}}
missing_values: ["", "todo", "Unknown"]
templates: ["A chest X-ray ({{view}}) with finding {{finding}}."]
metadata: [patientid, sex, age, view, finding, location]
labels:
  - {{name: covid, type: binary, column: finding, positive: [COVID-19],
      negative: [Pneumocystis, ARDS, No Finding], states: [other finding, COVID-19]}}
"""


# ----------------------------------------------------------------------------- data
def write_pneumonia(npz: Path, out: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """PNG files + metadata.csv + spec.yaml of the official split; labels per split."""
    from PIL import Image

    data = np.load(npz)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, labels = ["image_id,file,split,label"], {}
    for split in SPLITS:
        images, y = data[f"{split}_images"], data[f"{split}_labels"].ravel().astype(int)
        labels[split] = y
        for i, (img, lab) in enumerate(zip(images, y)):
            name = f"{split}{i:05d}"
            Image.fromarray(img).save(out / "images" / f"{name}.png")
            rows.append(f"{name},{name}.png,{split},{'pneumonia' if lab else 'normal'}")
    (out / "metadata.csv").write_text("\n".join(rows) + "\n")
    (out / "spec.yaml").write_text(PNEUMONIA_SPEC)
    return out / "spec.yaml", labels


def pixels(folder: Path, split: str, n: int, preprocess: Any) -> torch.Tensor:
    from PIL import Image

    return torch.stack([preprocess(Image.open(folder / "images" / f"{split}{i:05d}.png")
                                   .convert("RGB")) for i in range(n)])


# ----------------------------------------------------------------------------- scoring
def score(y_val: np.ndarray, s_val: np.ndarray, y_test: np.ndarray, s_test: np.ndarray,
          seconds: float, cpu_seconds: float) -> dict[str, Any]:
    """Test AUC [95% CI], and accuracy / sensitivity / specificity at the val threshold."""
    from medsig.evaluate.bootstrap import bootstrap_ci
    from medsig.metrics.classification import binary_metrics, roc_auc
    from medsig.models.thresholds import youden_threshold

    threshold = youden_threshold(y_val, s_val)
    m = binary_metrics(y_test, s_test, threshold)
    ci = bootstrap_ci(roc_auc, y_test, s_test, n_boot=1000, seed=0)
    return {"auc": round(ci.point, 4), "auc_ci": [round(ci.low, 4), round(ci.high, 4)],
            "accuracy": round(m["accuracy"], 4), "sensitivity": round(m["sensitivity"], 4),
            "specificity": round(m["specificity"], 4), "threshold": round(threshold, 4),
            "val_auc": round(roc_auc(y_val, s_val), 4), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1)}


def medsig_scores(folder: Path, data: Path, labels: dict[str, np.ndarray],
                  spec: Path | None = None) -> dict[str, np.ndarray]:
    """Pneumonia probability per val / test image from a medsig model folder."""
    from medsig.models.predictor import load_predictor

    pred = load_predictor(folder, device="cpu", spec=spec)
    out = {}
    for split in ("val", "test"):
        px = pixels(data, split, len(labels[split]), pred.preprocess)
        probs = np.concatenate([pred.predict_pixels(px[i:i + 256])
                                for i in range(0, len(px), 256)])
        head = next(h for h in pred.heads if h["name"] == "pneumonia")
        out[split] = probs[:, head["offset"] + head["size"] - 1]
    return out


# ----------------------------------------------------------------------------- baseline
class SmallCNN(torch.nn.Module):
    """Three conv blocks and a linear layer: the model a user writes for 28 px X-rays."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out),
                       torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(128 * 3 * 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)


def cnn_baseline(npz: Path, epochs: int, seed: int = 0) -> tuple[dict, dict]:
    """Adam 1e-3, batch 64, `epochs` epochs; the epoch with the best val AUC is kept."""
    from medsig.metrics.classification import roc_auc

    torch.manual_seed(seed)
    data = np.load(npz)
    x = {s: torch.tensor(data[f"{s}_images"], dtype=torch.float32).unsqueeze(1) / 255.0
         for s in SPLITS}
    y = {s: torch.tensor(data[f"{s}_labels"].ravel(), dtype=torch.float32) for s in SPLITS}
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, state = -1.0, None
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y["train"]), generator=g)
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x["train"][b]), y["train"][b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            auc = roc_auc(y["val"].numpy(), model(x["val"]).numpy())
        if auc > best:
            best, state = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        scores = {s: torch.sigmoid(model(x[s])).numpy() for s in ("val", "test")}
    return scores, {s: y[s].numpy().astype(int) for s in ("val", "test")}


# ----------------------------------------------------------------------------- part 1
def pneumonia(shared: Path, work: Path, cnn_epochs: int, contrastive_epochs: int | None,
              reuse: bool) -> dict[str, Any]:
    from medsig.models.tiny import write_tiny
    from medsig.train import train
    from medsig.train.probe import train_probe

    npz = shared / "pneumoniamnist" / "pneumoniamnist.npz"
    data = work / "pneumonia"
    spec, labels = write_pneumonia(npz, data)
    base = work / "models" / "tiny"
    if not (reuse and (base / "medsig_tiny.json").is_file()):
        write_tiny(base, image_size=32, patch_size=4, seed=0)
    results: dict[str, Any] = {}

    def run(name: str, out: Path, fn: Any, zeroshot: bool = False) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        if reuse and (out / "medsig.json").is_file():  # trained by an earlier run
            folder = out
            seconds = json.loads((out / "medsig.json").read_text()).get(
                "training", {}).get("seconds", float("nan"))
            cpu = float("nan")
        else:
            folder = fn()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        s = medsig_scores(folder, data, labels, spec if zeroshot else None)
        results[name] = score(labels["val"], s["val"], labels["test"], s["test"], seconds, cpu)
        print(name, results[name], flush=True)

    common = {"spec": str(spec), "model": str(base)}
    run("medsig classify (defaults, from scratch)", work / "classify",
        lambda: train({**common, "objective": "classify", "out": str(work / "classify")}))
    run("medsig probe (logistic, frozen random model)", work / "probe",
        lambda: train_probe({**common, "objective": "probe", "out": str(work / "probe")}))
    epochs = {"optim": {"epochs": contrastive_epochs}} if contrastive_epochs else {}
    run(f"medsig contrastive ({contrastive_epochs or 'default'} epochs) + zero-shot",
        work / "contrastive",
        lambda: train({**common, "objective": "contrastive", "out": str(work / "contrastive"),
                       "eval": {"best_metric": "val/recall@1"}, **epochs}), zeroshot=True)
    start, cpu = time.perf_counter(), time.process_time()
    scores, y = cnn_baseline(npz, cnn_epochs)
    name = f"plain PyTorch CNN (3 conv layers, Adam, {cnn_epochs} epochs)"
    results[name] = score(y["val"], scores["val"], y["test"], scores["test"],
                          time.perf_counter() - start, time.process_time() - cpu)
    print(name, results[name], flush=True)
    return results


# ----------------------------------------------------------------------------- part 2
def covid(shared: Path, work: Path) -> dict[str, Any]:
    """The covid-cxr set end to end with a tiny random SigLIP."""
    from medsig.data.collection import load_collection
    from medsig.data.inspect import inspect_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.evaluate.run import evaluate
    from medsig.index.runner import embed_collection
    from medsig.index.search import search
    from medsig.index.store import close_store
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    out, steps = work / "covid", {}
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.yaml"
    spec.write_text(COVID_SPEC.format(root=shared / "covid-cxr"))
    base = write_tiny(work / "models" / "tiny64", seed=0)

    def step(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        steps[name] = round(time.perf_counter() - start, 2)
        return result

    col = load_collection(spec)
    report = step("inspect", lambda: inspect_collection(col))
    res = step("split by patient", lambda: split_collection(col, seed=0))
    splits, _ = write_split(col, res, out)
    set_spec_splits(spec, splits.name)
    col = load_collection(spec)
    emb = step("embed + index", lambda: embed_collection(col, str(base), out / "qdrant", "cxr",
                                                         progress=False))
    hits_text = step("search by text", lambda: search(
        out / "qdrant", "cxr", text="A chest X-ray (PA) with finding COVID-19.",
        model=str(base), k=5))
    hits_image = step("search by image, PA only", lambda: search(
        out / "qdrant", "cxr", image=col.image_paths[0], model=str(base), k=5,
        where=["view=PA"]))
    close_store(out / "qdrant")
    result: dict[str, Any] = {"rows": report.rows, "groups": report.groups,
                              "warnings": report.warnings, "split": res.counts(),
                              "embedded": emb.embedded, "skipped": emb.to_dict().get("skipped"),
                              "search_text_hits": len(hits_text),
                              "search_image_hits": len(hits_image)}
    try:
        probe = step("probe", lambda: train_probe({"spec": str(spec), "model": str(base),
                                                   "out": str(out / "probe"),
                                                   "objective": "probe"}))
        metrics = step("evaluate (test split)", lambda: evaluate(
            spec, {"base": str(base), "probe": str(probe)}, split="test", out=out / "report",
            n_boot=200, seed=0))
        result["evaluation"] = _headlines(metrics)
    except Exception as exc:  # noqa: BLE001 - a tiny real set may not allow every step
        result["stopped"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = steps
    print("covid-cxr", json.dumps(result, default=str)[:2000], flush=True)
    return result


def _headlines(metrics: dict[str, Any]) -> dict[str, Any]:
    """{metric: {model: [point, low, high]}} of the report's headline table."""
    return {metric: {model: [round(r["point"], 4), round(r["low"], 4), round(r["high"], 4)]
                     for model, r in row.items() if isinstance(r, dict) and "point" in r}
            for metric, row in (metrics.get("headline") or {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--cnn-epochs", type=int, default=20)
    ap.add_argument("--contrastive-epochs", type=int, default=None,
                    help="default: the random-start default (20)")
    ap.add_argument("--reuse", action="store_true",
                    help="score model folders an earlier run left in --work")
    ap.add_argument("--skip-covid", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real.json")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"real data folder {args.data} is absent")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = args.work or Path(tempfile.mkdtemp(prefix="medsig-real-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "load_before": os.getloadavg()},
                               "work": str(work)}
    start = time.perf_counter()
    results["pneumoniamnist"] = pneumonia(args.data, work, args.cnn_epochs,
                                          args.contrastive_epochs, args.reuse)
    if not args.skip_covid:
        results["covid_cxr"] = covid(args.data, work)
    results["machine"]["load_after"] = os.getloadavg()
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
