"""Safe outputs through the HTTP API: OOD refusal, conformal states, calibrated thresholds
in /v1/labels, saliency overlays; and Grad-CAM pointing at a drawn lesion."""

from __future__ import annotations

import base64
import copy
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsig.models.ood import NOT_ASSESSED
from tests.test_serve import serve_env


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from medsig.serve import ServeSettings, create_app

    env = serve_env(tmp_path_factory)
    app = create_app(env.predictor, settings=ServeSettings(api_key=None))
    with TestClient(app) as c:
        yield c, env


def _png(image: Image.Image) -> bytes:
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _predict(c, data: bytes, explain: bool = False) -> dict:
    r = c.post("/v1/predict" + ("?explain=true" if explain else ""),
               files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_labels_show_gate_and_conformal_thresholds(client) -> None:
    c, env = client
    body = c.get("/v1/labels").json()
    safety = env.predictor.safety
    assert body["ood"]["threshold"] == pytest.approx(safety.ood.threshold, abs=1e-5)
    assert body["ood"]["false_reject_target"] == 0.05
    for h in body["heads"]:
        assert h["alpha"] == 0.1 and h["conformal_qhat"] == safety.conformal[h["name"]]["qhat"]
        assert h["calibration"] == safety.calibration[h["name"]]


def test_in_distribution_image_gets_states_and_sets(client) -> None:
    c, env = client
    gate = env.predictor.safety.ood
    scores = []
    for path in env.images[:20]:
        body = _predict(c, path.read_bytes())
        scores.append(body["ood"]["score"])
        assert body["ood"]["threshold"] == pytest.approx(gate.threshold, abs=1e-5)
        assert body["ood"]["flagged"] == (body["ood"]["score"] > gate.threshold)
        if body["status"] == "not_assessed":
            continue
        for lab in body["labels"]:
            assert lab["alpha"] == 0.1 and lab["state"] in ("confident", "uncertain")
            if lab["kind"] != "multilabel":
                assert (lab["state"] == "uncertain") == (len(lab["conformal_set"]) != 1)
                assert set(lab["conformal_set"]) <= set(lab["classes"])
        unsure = [lab["name"] for lab in body["labels"] if lab["state"] == "uncertain"]
        assert (body["status"] == "uncertain") == bool(unsure)
        for name in unsure:
            assert f"- {name}: uncertain — needs review" in body["summary"]
    # most generated wounds (train and val rows included) pass a 5 %-false-reject gate
    assert np.mean(np.asarray(scores) > gate.threshold) <= 0.3


@pytest.mark.parametrize("image", [
    Image.new("RGB", (96, 96), (250, 250, 250)),
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.uint8)),
], ids=["blank", "noise"])
def test_unlike_images_are_not_assessed(client, image) -> None:
    c, _ = client
    body = _predict(c, _png(image))
    assert body["ood"]["flagged"] and body["status"] == "not_assessed"
    assert body["labels"] == []
    assert NOT_ASSESSED in body["summary"] and "needs attention" not in body["summary"]


def test_uncertain_state_when_every_state_is_plausible(client) -> None:
    from medsig.models.heads import heads_of
    from medsig.serve import safe
    from medsig.serve.summary import label_results, summarize

    _, env = client
    predictor = copy.copy(env.predictor)
    predictor.safety = copy.deepcopy(env.predictor.safety)
    for entry in predictor.safety.conformal.values():
        entry["qhat"] = [1.0] * len(entry["qhat"])  # a set holds every state
    heads = heads_of(predictor.heads)
    probs = np.full(sum(h.size for h in heads), 0.5, np.float32)
    results = safe.with_sets(predictor, heads, label_results(heads, probs), probs)
    assert all(r.state == "uncertain" for r in results)
    assert safe.status_of(results, None) == "uncertain"
    text = summarize(results, "m", "v")
    assert text.count("uncertain — needs review") == len(results)


def test_explain_returns_an_overlay_per_label(client) -> None:
    c, env = client
    body = _predict(c, env.images[0].read_bytes(), explain=True)
    if body["status"] == "not_assessed":
        pytest.skip("the first wound was refused by the gate")
    for lab in body["labels"]:
        png = Image.open(BytesIO(base64.b64decode(lab["saliency_png"])))
        assert png.format == "PNG" and png.size == (64, 64)
    plain = _predict(c, env.images[0].read_bytes())
    assert all(lab["saliency_png"] is None for lab in plain["labels"])


def lesion_set(root: Path, n: int = 200, size: int = 64, seed: int = 0):
    """Skin-toned noise, half with a red disk (the finding); its masks per row."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    rows, masks = [], {}
    for i in range(n):
        img = np.clip(rng.normal([200, 160, 140], 12, (size, size, 3)), 0, 255)
        r = rng.uniform(7, 11)
        cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if i % 2 == 0:
            img[masks[i]] = np.clip(rng.normal([150, 30, 40], 10, (masks[i].sum(), 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(root / "img" / f"{i}.png")
        split = ("train", "train", "train", "val", "test")[i % 5]
        rows.append(f"{i},{i}.png,{'yes' if i % 2 == 0 else 'no'},{split}")
    (root / "t.csv").write_text("id,file,lesion,split\n" + "\n".join(rows) + "\n")
    (root / "spec.yaml").write_text(
        "name: lesions\ntable: t.csv\nimage_root: img\n"
        "columns: {image: file, id: id, split: split}\nlabels:\n"
        "  - {name: lesion, type: binary, column: lesion, positive: ['yes'], "
        "negative: ['no']}\n")
    return root / "spec.yaml", masks


def test_grad_cam_mass_falls_on_the_lesion_more_than_a_random_map(tmp_path) -> None:
    """Honest small check (tiny random encoder + probe): the map's mass inside the lesion
    beats a random map's by 2x; bench/saliency.py measures it against the 60 % goal."""
    from medsig.data.images import load_image
    from medsig.models.predictor import load_predictor
    from medsig.models.saliency import grad_cam, mass_inside
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    spec, masks = lesion_set(tmp_path / "data")
    tiny = write_tiny(tmp_path / "tiny", arch="siglip", image_size=64, seed=0)
    predictor = load_predictor(train_probe(spec, tiny, tmp_path / "probe",
                                           eval={"safe_outputs": False}))
    inside, base = [], []
    rng = np.random.default_rng(1)
    for i in range(4, 200, 10):  # test rows (i % 5 == 4) with a lesion (even i)
        pixels = predictor.preprocess(load_image(tmp_path / "data" / "img" / f"{i}.png"))
        cam = grad_cam(predictor, pixels, 0)
        mask = masks[i]
        inside.append(mass_inside(cam, mask))
        base.append(mass_inside(rng.random(cam.shape), mask))
    print(f"Grad-CAM mass inside the lesion {np.mean(inside):.3f} vs random {np.mean(base):.3f}")
    assert np.mean(inside) >= 2 * np.mean(base)


def test_web_page_shows_refusal_states_and_saliency(tmp_path_factory, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    from medsig.serve import ServeSettings, create_app
    from tests.browser import browser, severe_logs
    from tests.test_serve import LiveServer
    from tests.test_serve_web import _wait

    env = serve_env(tmp_path_factory)
    driver = browser("1100,1400")
    server = LiveServer(create_app(env.predictor, settings=ServeSettings(api_key=None)))
    try:
        import torch

        from medsig.models.ood import pixel_scores

        gate = env.predictor.safety.ood
        pixels = torch.stack([env.predictor.preprocess(Image.open(p).convert("RGB"))
                              for p in env.images[:10]])
        scores = gate.combined(pixel_scores(gate, env.predictor, pixels))
        photo = env.images[int(np.argmin(scores))]  # clearly in distribution
        driver.get(server.url + "/")
        _wait(driver, "#status")
        driver.find_element(By.ID, "explain").click()
        driver.find_element(By.ID, "file").send_keys(str(photo))
        cards = _wait(driver, "#labels .label", count=len(env.predictor.heads))
        _wait(driver, "#labels img.saliency", count=len(cards))
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#labels img.saliency')]"
            ".filter(i => i.complete && i.naturalWidth === 64).length")
        assert loaded == len(cards)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#labels .conformal")) == len(cards)
        time.sleep(0.3)
        driver.save_screenshot("/tmp/medsig-serve-page-explain.png")
        blank = tmp_path / "blank.png"
        Image.new("RGB", (120, 90), (240, 240, 240)).save(blank)
        driver.find_element(By.ID, "file").send_keys(str(blank))
        verdict = _wait(driver, "#verdict.not_assessed:not([hidden])")[0]
        assert "not assessed" in verdict.text
        assert driver.find_elements(By.CSS_SELECTOR, "#labels .label") == []
        assert "not assessed" in driver.find_element(By.ID, "summary").text
        assert severe_logs(driver) == []
    finally:
        driver.quit()
        server.stop()


def test_wound_synth_writes_the_wound_region_masks(tmp_path) -> None:
    """`medsig data synth wound` also writes masks/<id>.png: the region where the findings
    are drawn (for the saliency checks)."""
    from medsig.data.collection import load_collection
    from medsig.data.synth import synthesize

    spec = synthesize("wound", tmp_path / "w", n=6, seed=3, image_size=48)
    col = load_collection(spec)
    for rid, path in zip(col.ids, col.image_paths):
        region = np.asarray(Image.open(spec.parent / "masks" / f"{rid}.png")) > 0
        assert region.shape == Image.open(path).size[::-1]
        assert 0.02 < region.mean() < 0.8
