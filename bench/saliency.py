"""Benchmark: does the saliency map point at the finding? Methods x models, side by side.

Two generated data sets whose finding masks are known:
- lesions: skin-toned noise, half with a red disk (the finding; tests/test_serve_safe.py's
  ``lesion_set``), label "lesion";
- wounds: ``medsig data synth wound`` (writes ``masks/``, the wound region where the findings
  are drawn), label "erythema".
Models: a linear probe on a tiny *random* SigLIP (the encoder never learns anything), and
tiny classifiers (SigLIP, CLIP) fine-tuned end to end on the train split. For every test
image with the finding: the share of the map's mass inside the mask (``mass_inside``) for
each method of ``medsig.models.saliency`` against a random map (goal >= 0.60), and the
time per map; beside it the model's test ROC AUC for the label (a map can only point at a
finding the model has learned). Writes bench/results/saliency.json.

    .venv/bin/python bench/saliency.py [--n 400] [--epochs 10] [--like HUB_ID]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 0.60


def test_auc(predictor, paths: list[Path], targets: np.ndarray, label: str) -> float:
    """ROC AUC of ``label`` on the test images: did the model learn the finding?"""
    import torch

    from medsig.data.images import load_image
    from medsig.metrics.classification import roc_auc
    from medsig.models.heads import Head

    column = next(Head.of(h) for h in predictor.heads if h.name == label).offset
    pixels = torch.stack([predictor.preprocess(load_image(p)) for p in paths])
    return float(roc_auc(targets, predictor.raw_probabilities(pixels)[:, column]))


def measure(predictor, items: list[tuple[Path, np.ndarray]], label: str) -> dict:
    """Per method: mean mass inside the masks, the random map's, ms per map, n."""
    from medsig.data.images import load_image
    from medsig.models.heads import Head
    from medsig.models.saliency import METHODS, mass_inside, saliency_map, to_image

    column = next(Head.of(h) for h in predictor.heads if h.name == label).offset
    rng = np.random.default_rng(1)
    out = {}
    for method in METHODS:
        inside, base, start = [], [], time.perf_counter()
        for path, mask in items:
            image = load_image(path)
            cam = saliency_map(predictor, predictor.preprocess(image), column, method)
            if cam is None:
                break
            cam = to_image(cam, image.size, predictor.preprocess)
            inside.append(mass_inside(cam, mask))
            base.append(mass_inside(rng.random(cam.shape), mask))
        if inside:
            out[method] = {"inside": float(np.mean(inside)), "random": float(np.mean(base)),
                           "ms": 1000 * (time.perf_counter() - start) / len(inside),
                           "n": len(inside)}
    return out


def classifier(spec: Path, tiny: Path, out: Path, epochs: int, labels=None) -> Path:
    from medsig.train import train

    return train({"spec": str(spec), "model": str(tiny), "out": str(out),
                  "objective": "classify", "device": "cpu", "precision": "fp32",
                  **({"labels": labels} if labels else {}),
                  "optim": {"epochs": epochs, "batch_size": 16, "lr": 3e-3},
                  "eval": {"safe_outputs": False}})


def lesions(root: Path, n: int, epochs: int, tinies: dict[str, Path]) -> dict:
    from medsig.models.predictor import load_predictor
    from medsig.train.probe import train_probe
    from tests.test_serve_safe import lesion_set

    spec, masks = lesion_set(root / "lesions", n=n)
    items = [(root / "lesions" / "img" / f"{i}.png", masks[i])
             for i in range(4, n, 10)]  # test rows (i % 5 == 4) with a lesion (even i)
    models = {"probe, random SigLIP": train_probe(spec, tinies["siglip"], root / "l-probe",
                                                  eval={"safe_outputs": False})}
    for arch, tiny in tinies.items():
        models[f"{arch} classifier, fine-tuned"] = classifier(spec, tiny, root / f"l-{arch}",
                                                              epochs)
    rows = range(4, n, 5)  # every test row, for the AUC
    paths = [root / "lesions" / "img" / f"{i}.png" for i in rows]
    targets = np.asarray([i % 2 == 0 for i in rows], int)
    return {name: {"test_auc": test_auc(p, paths, targets, "lesion"),
                   **measure(p, items, "lesion")}
            for name, p in ((name, load_predictor(m)) for name, m in models.items())}


def wounds(root: Path, n: int, epochs: int, tiny: Path) -> dict:
    from PIL import Image

    from medsig.data.collection import load_collection
    from medsig.data.split import split_spec
    from medsig.data.synth import synthesize
    from medsig.models.predictor import load_predictor
    from medsig.train.probe import train_probe

    spec = synthesize("wound", root / "wound", n=n, seed=0, image_size=64)
    split_spec(spec, duplicates=0)
    col = load_collection(spec)
    rows = np.nonzero((np.asarray(col.split) == "test")
                      & (col.labels["erythema"].targets == 1))[0]
    items = [(Path(col.image_paths[i]),
              np.asarray(Image.open(spec.parent / "masks" / f"{col.ids[i]}.png")) > 0)
             for i in rows]
    models = {"probe, random SigLIP": train_probe(spec, tiny, root / "w-probe",
                                                  eval={"safe_outputs": False}),
              "siglip classifier, fine-tuned": classifier(spec, tiny, root / "w-clf", epochs)}
    y = col.labels["erythema"].targets
    test = np.nonzero((np.asarray(col.split) == "test") & (y >= 0))[0]
    paths = [Path(col.image_paths[i]) for i in test]
    return {name: {"test_auc": test_auc(p, paths, y[test], "erythema"),
                   **measure(p, items, "erythema")}
            for name, p in ((name, load_predictor(m)) for name, m in models.items())}


def like_timing(root: Path, hub_id: str) -> dict:
    """Seconds per map of each method for a random checkpoint with ``hub_id``'s real
    architecture (a probe on 40 generated lesion images; what the CPU costs, not quality)."""
    from medsig.data.images import load_image
    from medsig.models.predictor import load_predictor
    from medsig.models.saliency import METHODS, saliency_map
    from medsig.models.tiny import write_like
    from medsig.train.probe import train_probe
    from tests.test_serve_safe import lesion_set

    spec, _ = lesion_set(root / "like-data", n=40)
    model = write_like(root / "like", hub_id)
    predictor = load_predictor(train_probe(spec, model, root / "like-probe",
                                           eval={"safe_outputs": False}))
    pixels = predictor.preprocess(load_image(root / "like-data" / "img" / "4.png"))
    out = {}
    for method in METHODS:
        start = time.perf_counter()
        saliency_map(predictor, pixels, 0, method)
        out[method] = time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--like", default=None, help="also time each method on a random "
                    "checkpoint with this hub id's architecture (e.g. "
                    "google/siglip-base-patch16-224)")
    args = ap.parse_args()
    from medsig.models.tiny import write_tiny

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tinies = {arch: write_tiny(root / f"tiny-{arch}", arch=arch, image_size=64, seed=0)
                  for arch in ("siglip", "clip")}
        results = {f"{args.n} generated lesions": lesions(root, args.n, args.epochs, tinies),
                   f"{args.n} generated wounds, erythema": wounds(root, args.n, args.epochs,
                                                                  tinies["siglip"])}
        timing = like_timing(root, args.like) if args.like else None
    seconds = time.perf_counter() - start
    print(f"tiny random checkpoints (64 px, patch 8, 2 layers); classifiers fine-tuned "
          f"{args.epochs} epochs; {seconds:.0f} s in all (shared, busy 2-core CPU)")
    print(f"{'data':<34}{'model':<30}{'test AUC':>9} {'method':<11}{'inside':>8}"
          f"{'random':>8}{'x':>6}{'ms/map':>8}{'n':>5}   goal >= {GOAL:.2f}")
    for data, models in results.items():
        for model, methods in models.items():
            auc = methods["test_auc"]
            for method, r in ((k, v) for k, v in methods.items() if k != "test_auc"):
                print(f"{data:<34}{model:<30}{auc:>9.3f} {method:<11}{r['inside']:>8.3f}"
                      f"{r['random']:>8.3f}{r['inside'] / r['random']:>6.1f}{r['ms']:>8.1f}"
                      f"{r['n']:>5}   {'ok' if r['inside'] >= GOAL else 'below goal'}")
    if timing:
        print(f"seconds per map, random {args.like} architecture + probe, CPU: "
              + ", ".join(f"{m} {t:.2f}" for m, t in timing.items()))
    out = Path(__file__).parent / "results" / "saliency.json"
    out.write_text(json.dumps({"args": vars(args), "seconds": round(seconds, 1),
                               "goal": GOAL, "results": results,
                               "like_seconds_per_map": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
