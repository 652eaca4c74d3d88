"""Benchmark: does the Grad-CAM map point at the finding?

Generated lesion images (skin-toned noise; half with a red disk, the finding, whose mask is
known), a tiny random SigLIP with a probe and with a fine-tuned classifier; for every test
image with a lesion: the share of the map's mass inside the mask, against a random map
(goal >= 0.60). Then generated wounds (``medsig data synth wound`` writes ``masks/``, the
wound region): the map of "erythema" on test wounds with erythema. Writes
bench/results/saliency.json.

    .venv/bin/python bench/saliency.py [--n 400] [--epochs 10]
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


def measure(predictor, root: Path, masks: dict, n: int) -> tuple[float, float]:
    from medsig.data.images import load_image
    from medsig.models.saliency import grad_cam, mass_inside

    rng = np.random.default_rng(1)
    inside, base = [], []
    for i in range(4, n, 10):  # test rows (i % 5 == 4) with a lesion (even i)
        cam = grad_cam(predictor, predictor.preprocess(load_image(root / "img" / f"{i}.png")), 0)
        inside.append(mass_inside(cam, masks[i]))
        base.append(mass_inside(rng.random(cam.shape), masks[i]))
    return float(np.mean(inside)), float(np.mean(base))


def wound(root: Path, tiny: Path) -> tuple[float, float]:
    """Probe on generated wounds; Grad-CAM of erythema inside the saved wound masks."""
    from PIL import Image

    from medsig.data.collection import load_collection
    from medsig.data.images import load_image
    from medsig.data.split import split_collection
    from medsig.data.synth import synthesize
    from medsig.models.heads import Head
    from medsig.models.predictor import load_predictor
    from medsig.models.saliency import grad_cam, mass_inside
    from medsig.train.probe import train_probe

    spec = synthesize("wound", root / "wound", n=400, seed=0, image_size=64)
    predictor = load_predictor(train_probe(spec, tiny, root / "wound-probe",
                                           eval={"safe_outputs": False}))
    col = load_collection(spec)
    split = split_collection(col, seed=0).split
    head = next(Head.of(h) for h in predictor.heads if h.name == "erythema")
    rng = np.random.default_rng(2)
    inside, base = [], []
    for i in np.nonzero((np.asarray(split) == "test")
                        & (col.labels["erythema"].targets == 1))[0]:
        region = np.asarray(Image.open(spec.parent / "masks" / f"{col.ids[i]}.png")) > 0
        cam = grad_cam(predictor, predictor.preprocess(load_image(col.image_paths[i])),
                       head.offset)
        inside.append(mass_inside(cam, region))
        base.append(mass_inside(rng.random(cam.shape), region))
    return float(np.mean(inside)), float(np.mean(base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    from medsig.models.predictor import load_predictor
    from medsig.models.tiny import write_tiny
    from medsig.train import train
    from medsig.train.probe import train_probe
    from tests.test_serve_safe import lesion_set

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec, masks = lesion_set(root / "data", n=args.n)
        tiny = write_tiny(root / "tiny", arch="siglip", image_size=64, seed=0)
        start = time.perf_counter()
        probe = train_probe(spec, tiny, root / "probe", eval={"safe_outputs": False})
        results["probe"] = measure(load_predictor(probe), root / "data", masks, args.n)
        clf = train({"spec": str(spec), "model": str(tiny), "out": str(root / "clf"),
                     "objective": "classify", "device": "cpu", "precision": "fp32",
                     "optim": {"epochs": args.epochs, "batch_size": 16, "lr": 3e-3},
                     "eval": {"safe_outputs": False}})
        results["classify"] = measure(load_predictor(clf), root / "data", masks, args.n)
        results["wound probe, erythema"] = wound(root, tiny)
        seconds = time.perf_counter() - start
    print(f"{args.n} generated lesion images (64 px), tiny random SigLIP; {seconds:.0f} s "
          "(shared, busy CPU)")
    print(f"{'model':<24}{'mass inside mask':>18}{'random map':>12}   goal >= 0.60")
    for name, (inside, base) in results.items():
        print(f"{name:<24}{inside:>18.3f}{base:>12.3f}   "
              f"{'ok' if inside >= 0.6 else 'BELOW GOAL'}")
    out = Path(__file__).parent / "results" / "saliency.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
