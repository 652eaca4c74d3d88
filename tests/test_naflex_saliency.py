"""Saliency for SigLIP 2 NaFlex inputs: a tiny NaFlex classifier trained on generated lesion
images; every method gives a finite map of the image's own aspect (a wide image: a wide
map), occlusion (in patch space) and rollout put their mass on the lesion far above a
random map, and ``/v1/predict?explain=true`` returns an overlay per label on the image's
own grid."""

from __future__ import annotations

import base64
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medsig.data.images import load_image
from medsig.data.patches import Patches
from medsig.models.saliency import mass_inside, saliency_map, to_image
from tests.test_serve_safe import lesion_set


def _wide_lesion(path, height: int = 48, width: int = 144, seed: int = 5) -> np.ndarray:
    """A skin-toned wide image with a red disk right of centre; returns the disk's mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - 24) ** 2 + (xx - 100) ** 2 <= 10 ** 2
    img = np.clip(rng.normal([200, 160, 140], 12, (height, width, 3)), 0, 255)
    img[mask] = np.clip(rng.normal([150, 30, 40], 10, (mask.sum(), 3)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return mask


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A tiny SigLIP 2 NaFlex classifier (patch 8, at most 64 patches) fine-tuned 4 epochs
    on 120 generated 64 x 64 lesion images; the held-out images with a lesion; a wide one."""
    from medsig.models.predictor import load_predictor
    from medsig.models.tiny import write_tiny
    from medsig.train import train

    root = tmp_path_factory.mktemp("naflex-saliency")
    spec, masks = lesion_set(root / "data", n=120)
    tiny = write_tiny(root / "tiny", arch="siglip2", image_size=64, patch_size=8, seed=0)
    folder = train({"spec": str(spec), "model": str(tiny), "out": str(root / "clf"),
                    "objective": "classify", "device": "cpu", "precision": "fp32",
                    "num_workers": 0, "optim": {"batch_size": 16, "lr": 3e-3, "epochs": 4},
                    "eval": {"safe_outputs": False, "at_start": False}})
    test = [(root / "data" / "img" / f"{i}.png", masks[i]) for i in range(4, 120, 10)]
    wide = root / "wide.png"
    return SimpleNamespace(predictor=load_predictor(folder), folder=folder, test=test,
                           wide=wide, wide_mask=_wide_lesion(wide))


@pytest.mark.parametrize("method", ["occlusion", "gradcam", "rollout"])
def test_every_method_maps_a_wide_image_on_its_own_grid(env, method) -> None:
    pre = env.predictor.preprocess
    image = load_image(env.wide)
    pixels = pre(image)
    rows, cols = pixels.spatial_shapes.tolist()
    assert isinstance(pixels, Patches) and cols > 2 * rows
    cam = saliency_map(env.predictor, pixels, 0, method)
    assert cam.shape == (rows * pre.patch_size, cols * pre.patch_size)
    assert np.isfinite(cam).all() and 0 <= cam.min() and cam.max() == pytest.approx(1.0)
    assert to_image(cam, image.size, pre).shape == (image.height, image.width)


@pytest.mark.parametrize("method", ["occlusion", "rollout"])
def test_map_mass_falls_on_the_lesion(env, method) -> None:
    """On held-out images and a wide one, the share of the map's mass inside the lesion:
    occlusion (in patch space) 0.54, rollout 0.73, a random map 0.06; the same maps
    turned upside down 0.02 (so a map on the wrong grid fails). Grad-CAM: 0.03, not
    asserted (as on the fixed-resolution models, tests/test_saliency.py)."""
    rng = np.random.default_rng(1)
    inside, base = [], []
    for path, mask in [*env.test, (env.wide, env.wide_mask)]:
        image = load_image(path)
        cam = to_image(saliency_map(env.predictor, env.predictor.preprocess(image), 0,
                                    method), image.size, env.predictor.preprocess)
        inside.append(mass_inside(cam, mask))
        base.append(mass_inside(rng.random(cam.shape), mask))
    print(f"NaFlex {method} mass inside the lesion {np.mean(inside):.3f} "
          f"vs random map {np.mean(base):.3f}")
    assert np.mean(inside) >= 0.4 and np.mean(inside) >= 5 * np.mean(base)


def test_padding_rows_are_never_occluded(env, monkeypatch) -> None:
    from medsig.models import saliency

    seen = []
    score = saliency.score_function(env.predictor, 0, differentiable=False)
    monkeypatch.setattr(saliency, "score_function",
                        lambda *a, **k: lambda px: (seen.append(px), score(px))[1])
    pixels = env.predictor.preprocess(load_image(env.wide))
    saliency.patch_occlusion(env.predictor, pixels, 0)
    n = int(pixels.pixel_attention_mask.sum())
    assert n < len(pixels.pixel_attention_mask) and len(seen) > 1
    for batch in seen[1:]:
        assert (batch.pixel_values[:, n:] == 0).all()
        assert (batch.pixel_values[:, :n] != pixels.pixel_values[:n]).any(dim=(1, 2)).all()


def test_predict_explain_returns_an_overlay_per_label(env) -> None:
    from fastapi.testclient import TestClient

    from medsig.serve import ServeSettings, create_app

    pre = env.predictor.preprocess
    rows, cols = pre(load_image(env.wide)).spatial_shapes.tolist()
    with TestClient(create_app(env.predictor, settings=ServeSettings(api_key=None))) as c:
        files = {"file": ("w.png", env.wide.read_bytes(), "image/png")}
        body = c.post("/v1/predict?explain=true&explain_method=occlusion", files=files).json()
    assert body["labels"], body
    for lab in body["labels"]:
        png = Image.open(BytesIO(base64.b64decode(lab["saliency_png"])))
        assert png.size == (cols * pre.patch_size, rows * pre.patch_size)
        assert lab["saliency_method"] == "occlusion"
