"""Saliency that points at the finding: a tiny model trained on generated images with known
finding masks; the default map (occlusion) puts most of its mass inside the mask on held-out
images, far above a random map. Plus the map <-> image geometry, the other methods on
CLS-pooled models, and the API's ``explain_method``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.test_serve_safe import lesion_set


def _mass(predictor, items, column, method="occlusion") -> tuple[float, float]:
    from medsig.data.images import load_image
    from medsig.models.saliency import mass_inside, saliency_map, to_image

    rng = np.random.default_rng(1)
    inside, base = [], []
    for path, mask in items:
        image = load_image(path)
        cam = to_image(saliency_map(predictor, predictor.preprocess(image), column, method),
                       image.size, predictor.preprocess)
        inside.append(mass_inside(cam, mask))
        base.append(mass_inside(rng.random(cam.shape), mask))
    return float(np.mean(inside)), float(np.mean(base))


@pytest.fixture(scope="module")
def lesion_models(tmp_path_factory):
    """A tiny SigLIP classifier fine-tuned on 200 generated lesion images (5 epochs), a tiny
    ViT classifier and a probe on a tiny CLIP (both read only the CLS token), a zero-shot
    SigLIP, and the held-out test images with a lesion."""
    from medsig.models.predictor import load_predictor
    from medsig.models.tiny import write_tiny
    from medsig.train import train
    from medsig.train.probe import train_probe

    root = tmp_path_factory.mktemp("saliency")
    spec, masks = lesion_set(root / "data", n=200)
    tiny = {arch: write_tiny(root / f"tiny-{arch}", arch=arch, image_size=64, seed=0)
            for arch in ("siglip", "clip", "vit")}

    def classifier(arch: str, **optim) -> object:
        return load_predictor(train({
            "spec": str(spec), "model": str(tiny[arch]), "out": str(root / arch),
            "objective": "classify", "device": "cpu", "precision": "fp32",
            "optim": {"batch_size": 16, "lr": 3e-3, **optim},
            "eval": {"safe_outputs": False, "at_start": False}}))

    clip_probe = train_probe(spec, tiny["clip"], root / "clip-probe",
                             eval={"safe_outputs": False})
    models = {"siglip": classifier("siglip", epochs=5),
              "vit": classifier("vit", epochs=1, max_steps=2),  # CLS-pooled; barely trained
              "clip-probe": load_predictor(clip_probe),
              "siglip-zeroshot": load_predictor(tiny["siglip"], spec=spec)}
    test = [(root / "data" / "img" / f"{i}.png", masks[i]) for i in range(4, 124, 10)]
    return models, test  # 12 test rows (i % 5 == 4) with a lesion (even i)


def test_occlusion_map_mass_falls_inside_the_lesion_after_training(lesion_models) -> None:
    """Issue 15: >= 60 % of the map's mass inside the finding's mask on held-out images
    (0.85 here; bench/saliency.py: 0.84 at 400 images; a random map: 0.07). Grad-CAM on
    the same model: 0.03, so this fails for a map that does not point at the finding."""
    models, test = lesion_models
    inside, base = _mass(models["siglip"], test, 0)
    print(f"occlusion mass inside the lesion {inside:.3f} vs random map {base:.3f}")
    assert inside >= 0.60
    assert inside >= 5 * base


@pytest.mark.parametrize("method", ["gradcam", "rollout"])
@pytest.mark.parametrize("model", ["clip-probe", "vit"])
def test_gradient_methods_give_maps_for_cls_pooled_models(lesion_models, model,
                                                          method) -> None:
    """CLIP's image features and ViT's classifier read only the CLS token: the last block's
    patch outputs get no gradient (an all-zero map before), so Grad-CAM falls back to the
    block's input; rollout reads out through the CLS token. (ViT's layers are found where
    transformers v5 keeps them: ``vit.layers``.)"""
    from medsig.models.saliency import saliency_map

    models, test = lesion_models
    predictor = models[model]
    pixels = predictor.preprocess(Image.open(test[0][0]).convert("RGB"))
    cam = saliency_map(predictor, pixels, 0, method)
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0) and cam.min() >= 0


def test_zero_shot_models_get_occlusion_maps_only(lesion_models) -> None:
    """Occlusion needs only forward passes, so zero-shot models are explained too; the
    gradient methods have no differentiable path there (None: no overlay)."""
    from medsig.models.saliency import saliency_map

    models, test = lesion_models
    zs = models["siglip-zeroshot"]
    assert zs.objective != "classify" and zs.probe_net is None
    pixels = zs.preprocess(Image.open(test[0][0]).convert("RGB"))
    cam = saliency_map(zs, pixels, 0, "occlusion")
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    assert saliency_map(zs, pixels, 0, "gradcam") is None
    assert saliency_map(zs, pixels, 0, "rollout") is None


def test_unknown_method_is_refused(lesion_models) -> None:
    from medsig.models.saliency import saliency_map

    models, _ = lesion_models
    with pytest.raises(ValueError, match="occlusion"):
        saliency_map(models["siglip"], models["siglip"].preprocess(
            Image.new("RGB", (64, 64))), 0, "lime")


@pytest.mark.parametrize("mode,edge", [("pad", None), ("resize", None), ("reference", 64)])
def test_to_image_undoes_the_preprocessing_geometry(mode, edge) -> None:
    """A disk on a non-square image, preprocessed like the model's input, mapped back onto
    the image: it lands where it was drawn."""
    from medsig.data.transforms import Preprocess
    from medsig.models.saliency import to_image

    for w, h in ((120, 80), (60, 150), (300, 40)):  # the last one: an elongated strip
        image = Image.new("RGB", (w, h))
        r = min(w, h) // 3
        box = (w // 3 - r // 2, h // 2 - r // 2, w // 3 + r // 2, h // 2 + r // 2)
        ImageDraw.Draw(image).ellipse(box, fill=(255, 255, 255))
        drawn = np.asarray(image)[..., 0] > 127
        pre = Preprocess(64, mode=mode, shortest_edge=edge)
        cam = pre.to_uint8(image)[0].float().numpy() / 255  # the disk on the model input
        back = to_image(cam, (w, h), pre) > 0.5
        assert back.shape == drawn.shape
        if mode == "reference":  # shortest edge + centre crop: compare where the model looked
            seen = to_image(np.ones((64, 64), np.float32), (w, h), pre) > 0.5
            drawn, back = drawn & seen, back & seen
        union = (drawn | back).sum()
        iou = (drawn & back).sum() / union if union else 1.0  # the disk outside the crop
        assert iou > 0.85, (mode, w, h, iou)


def test_predict_explain_method_query(tmp_path_factory) -> None:
    """`/v1/predict?explain=true&explain_method=gradcam` gives overlays; an unknown method
    a 422 naming the choices."""
    import base64
    from io import BytesIO

    from fastapi.testclient import TestClient

    from medsig.serve import ServeSettings, create_app
    from tests.test_serve import serve_env

    env = serve_env(tmp_path_factory)
    data = env.images[0].read_bytes()
    with TestClient(create_app(env.predictor, settings=ServeSettings(api_key=None))) as c:
        files = {"file": ("x.png", data, "image/png")}
        bad = c.post("/v1/predict?explain=true&explain_method=lime", files=files)
        assert bad.status_code == 422 and "occlusion" in bad.text
        body = c.post("/v1/predict?explain=true&explain_method=gradcam", files=files).json()
    if body["status"] == "not_assessed":
        pytest.skip("the first wound was refused by the gate")
    for lab in body["labels"]:
        png = Image.open(BytesIO(base64.b64decode(lab["saliency_png"])))
        assert png.format == "PNG" and lab["saliency_method"] == "gradcam"


def test_auto_takes_occlusion_for_a_small_tower_and_rollout_for_a_large_one_on_cpu(
        lesion_models, monkeypatch) -> None:
    from medsig.models import saliency

    model = lesion_models[0]["siglip"]
    assert saliency.resolve_method(model) == "occlusion"
    assert saliency.resolve_method(model, "gradcam") == "gradcam"
    monkeypatch.setattr(saliency, "OCCLUSION_CPU_MAX_PARAMS", 1000)  # as if SigLIP-base
    assert saliency.resolve_method(model) == "rollout"
    pixels = model.preprocess(Image.new("RGB", (64, 64), (200, 120, 90)))
    auto = saliency.saliency_map(model, pixels, 0)
    assert np.allclose(auto, saliency.saliency_map(model, pixels, 0, "rollout"))


def test_mcp_assess_image_takes_the_method(tmp_path_factory) -> None:
    """The MCP tool offers the same choice (an enum in its input schema)."""
    import asyncio
    import base64

    pytest.importorskip("mcp")
    from mcp import Client

    from medsig.serve import ServeSettings, create_app
    from medsig.serve.mcp import build_server
    from tests.test_serve import serve_env

    env = serve_env(tmp_path_factory)
    server = build_server(create_app(env.predictor, settings=ServeSettings(api_key=None))
                          .state.medsig)
    image = base64.b64encode(env.images[0].read_bytes()).decode()

    async def main() -> tuple:
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            got = await client.call_tool("assess_image", {
                "image_base64": image, "explain": True, "explain_method": "gradcam"})
            bad = await client.call_tool("assess_image", {
                "image_base64": image, "explain": True, "explain_method": "lime"})
            return tools, got, bad

    tools, got, bad = asyncio.run(main())
    prop = tools["assess_image"].input_schema["properties"]["explain_method"]
    assert prop["enum"] == ["auto", "occlusion", "gradcam", "rollout"]
    assert not got.is_error and bad.is_error
    body = got.structured_content
    assert body["status"] == "not_assessed" or all(lab["saliency_png"]
                                                   for lab in body["labels"])
