"""The HTTP API on a real uvicorn server (127.0.0.1, free port), driven with httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from medsig.serve import ServeSettings, create_app

_ENV: dict[str, SimpleNamespace] = {}


def serve_env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny SigLIP + probe trained on 120 generated wounds + a local Qdrant index (once)."""
    if "env" in _ENV:
        return _ENV["env"]
    from medsig.data.collection import load_collection
    from medsig.data.synth import synthesize
    from medsig.index.runner import embed_collection
    from medsig.models.encoder import Encoder
    from medsig.models.predictor import load_predictor
    from medsig.models.tiny import write_tiny
    from medsig.train.probe import train_probe

    root = tmp_path_factory.mktemp("serve")
    tiny = write_tiny(root / "tiny", arch="siglip", image_size=64, seed=0)
    spec = synthesize("wound", root / "data", n=120, seed=0, image_size=64)
    model_dir = train_probe(spec, tiny, root / "probe")
    encoder = Encoder.load(str(tiny))
    embed_collection(spec, encoder, root / "qdrant", "wounds", batch_size=64, num_workers=0,
                     progress=False)
    collection = load_collection(spec)
    _ENV["env"] = SimpleNamespace(
        root=root, tiny=tiny, spec=spec, model_dir=model_dir, store=root / "qdrant",
        collection="wounds", predictor=load_predictor(model_dir), encoder=encoder,
        images=collection.image_paths, ids=collection.ids,
        image_root=collection.spec.image_root_path,
        meta=json.loads((Path(model_dir) / "medsig.json").read_text()))
    return _ENV["env"]


class LiveServer:
    """uvicorn in a thread on a socket bound to a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> SimpleNamespace:
    return serve_env(tmp_path_factory)


@pytest.fixture(scope="session")
def live(env):
    settings = ServeSettings(api_key=None, max_upload_bytes=4 * 1024 * 1024,
                             max_pixels=2_000_000, max_wait_ms=25)
    server = LiveServer(create_app(env.predictor, store=env.store, collection=env.collection,
                                   settings=settings))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


def image_bytes(path: Path, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    image = Image.open(path).convert("RGB")
    if size:
        image = image.resize(size)
    out = BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def dicom_bytes(array: np.ndarray) -> bytes:
    """A 16-bit MONOCHROME2 DICOM of ``array`` ((rows, columns) or (frames, rows, columns))."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows, ds.Columns = array.shape[-2:]
    if array.ndim == 3:  # (frames, rows, columns): a multi-frame image
        ds.NumberOfFrames = array.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = array.astype(np.uint16).tobytes()
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def expect_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in response.text and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body


def no_absolute_paths(value) -> bool:
    if isinstance(value, dict):
        return all(no_absolute_paths(v) for v in value.values())
    if isinstance(value, list):
        return all(no_absolute_paths(v) for v in value)
    return not (isinstance(value, str) and (value.startswith("/") or value[1:3] == ":\\"))


# -- model routes ----------------------------------------------------------------------------
def test_health_and_labels(live, env) -> None:
    health = live.get("/health").json()
    assert health["status"] == "ok" and health["search"] and not health["auth_required"]
    assert health["model"] == {"name": env.predictor.name, "version": env.predictor.version}
    labels = live.get("/v1/labels").json()
    heads = [h.to_dict() for h in env.predictor.heads]  # thresholds after the temperatures
    assert [h["name"] for h in labels["heads"]] == [h["name"] for h in heads]
    for got, want in zip(labels["heads"], heads):
        assert got["classes"] == want["classes"] and got["kind"] == want["kind"]
        assert got["thresholds"] == pytest.approx(want.get("thresholds") or [])
    assert live.get("/openapi.json").json()["paths"].keys() >= {
        "/v1/predict", "/v1/search", "/v1/embed", "/v1/labels", "/health"}
    assert live.get("/docs").status_code == 200


def test_predict_matches_the_model_and_thresholds(live, env) -> None:
    from medsig.data.images import load_image

    path = env.images[0]
    r = live.post("/v1/predict", files={"file": ("x.jpg", path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    pixels = env.predictor.preprocess(load_image(path, draft_size=None))
    expected = np.asarray(env.predictor.predict_pixels(pixels[None]))[0]
    raw = np.asarray(env.predictor.raw_probabilities(pixels[None]))[0]
    saved = {h["name"]: h for h in env.meta["heads"]}
    heads = {h.name: h.to_dict() for h in env.predictor.heads}  # thresholds after temperatures
    assert [lab["name"] for lab in body["labels"]] == list(heads)
    for lab in body["labels"]:
        h = heads[lab["name"]]
        probs = [s["probability"] for s in lab["scores"]]
        assert probs == pytest.approx(expected[h["offset"]:h["offset"] + h["size"]], abs=1e-4)
        if lab["kind"] == "binary":
            t = h["thresholds"][0]
            assert lab["threshold"] == pytest.approx(t)
            assert lab["decision"] == h["classes"][int(lab["probability"] >= t)]
            # calibration moves probability and threshold together: the same decision
            raw_yes = raw[h["offset"]] >= saved[lab["name"]]["thresholds"][0]
            assert lab["decision"] == h["classes"][int(raw_yes)]
            assert lab["probability_of"] == h["classes"][1]  # always P(positive state)
            line = f"{lab['name']}: {lab['decision']} (P({h['classes'][1]}) = " \
                f"{lab['probability']:.2f}"
            if lab["state"] == "uncertain":
                line = f"{lab['name']}: uncertain — needs review"
            assert line in body["summary"]
        elif lab["kind"] == "multiclass":
            assert sum(probs) == pytest.approx(1.0, abs=1e-3)
            assert lab["decision"] == h["classes"][int(np.argmax(probs))]
    assert "not a diagnosis" in body["summary"]
    assert body["model"]["name"] == env.predictor.name and body["image"]["format"] == "jpeg"
    assert body["timing"]["total_ms"] > 0 and body["timing"]["batch_size"] >= 1


def test_predict_sniffs_formats_from_bytes(live, env) -> None:
    path = env.images[1]
    cases = {"png": image_bytes(path, "PNG"), "webp": image_bytes(path, "WEBP"),
             "dicom": dicom_bytes(np.linspace(0, 4000, 64 * 48).reshape(48, 64))}
    for fmt, data in cases.items():
        # a misleading name and content type: the bytes decide
        r = live.post("/v1/predict", files={"file": ("photo.gif", data, "text/plain")})
        assert r.status_code == 200, (fmt, r.text)
        assert r.json()["image"]["format"] == fmt


def test_concurrent_requests_are_micro_batched_without_changing_results(live, env) -> None:
    datas = [p.read_bytes() for p in env.images[:8]]
    alone = [live.post("/v1/predict", files={"file": ("a.jpg", d)}).json() for d in datas]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=str(live.base_url), timeout=30) as client:
            rs = await asyncio.gather(*(client.post("/v1/predict", files={"file": ("a.jpg", d)})
                                        for d in datas))
        return [r.json() for r in rs]

    together = asyncio.run(burst())
    assert max(b["timing"]["batch_size"] for b in together) > 1
    for a, b in zip(alone, together):
        pa = [s["probability"] for lab in a["labels"] for s in lab["scores"]]
        pb = [s["probability"] for lab in b["labels"] for s in lab["scores"]]
        assert pa == pytest.approx(pb, abs=1e-4)


# -- bad input -------------------------------------------------------------------------------
def test_every_bad_upload_gets_a_json_4xx(live, env) -> None:
    jpeg = env.images[2].read_bytes()
    big_png = image_bytes(env.images[2], "PNG", size=(1600, 1300))  # 2.08 MP > 2 MP limit
    cases = [
        ({"file": ("e.jpg", b"", "image/jpeg")}, 400, "empty"),
        ({"file": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, 400, "truncated"),
        ({"file": ("n.jpg", b"hello, I am text" * 20, "image/jpeg")}, 415, "not_an_image"),
        ({"file": ("g.gif", b"GIF89a" + b"\0" * 100, "image/gif")}, 415, None),
        ({"file": ("b.png", big_png, "image/png")}, 413, "too_large"),
        ({"file": ("h.jpg", b"\xff\xd8\xff" + b"\0" * (4 * 1024 * 1024 + 10))}, 413,
         "too_large"),
        ({"image": ("x.jpg", jpeg, "image/jpeg")}, 422, "missing_field"),
    ]
    for files, status, code in cases:
        expect_error(live.post("/v1/predict", files=files), status, code)
    expect_error(live.post("/v1/predict", data={"text": "no file"}), 422, "missing_field")
    expect_error(live.post("/v1/predict", json={"file": "x"}), 415, "unsupported_media_type")
    expect_error(live.post("/v1/predict", content=b"--zz\r\ngarbage",
                           headers={"content-type": "multipart/form-data; boundary=zz"}), 422)
    expect_error(live.post("/v1/predict", content=b"x",
                           headers={"content-type": "multipart/form-data"}), 422)
    expect_error(live.get("/v1/predict"), 405, "method_not_allowed")
    expect_error(live.get("/v1/nothing"), 404, "not_found")
    expect_error(live.post("/v1/search", json={"text": ""}), 422)
    expect_error(live.post("/v1/search", json={"text": "x", "k": 0}), 422)
    expect_error(live.post("/v1/search", content=b"{not json",
                           headers={"content-type": "application/json"}), 422, "invalid_json")
    expect_error(live.post("/v1/search", data={"text": "x", "where": "no operator"}), 422,
                 "invalid_filter")
    expect_error(live.post("/v1/search", data={"text": "x", "k": "many"}), 422)
    expect_error(live.post("/v1/embed", data={}), 422, "missing_field")


def test_an_elongated_image_never_builds_a_huge_canvas(live, monkeypatch) -> None:
    buf = BytesIO()
    Image.new("RGB", (1, 20_000), (200, 0, 0)).save(buf, format="PNG")  # 100 bytes or so
    real_new = Image.new

    def guarded(mode, size, *args, **kwargs):
        assert size[0] * size[1] <= 4_000_000, f"a {size} canvas for a 1 x 20,000 upload"
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", guarded)  # the server runs in this process
    r = live.post("/v1/predict", files={"file": ("strip.png", buf.getvalue())})
    assert r.status_code == 200, r.text


def test_uploads_never_touch_the_disk(live, env, monkeypatch) -> None:
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file was created")

    for name in ("mkstemp", "TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    assert len(out.getvalue()) > 1024 * 1024  # beyond Starlette's in-memory spool size
    r = live.post("/v1/predict", files={"file": ("big.png", out.getvalue(), "image/png")})
    assert r.status_code == 200, r.text


# -- search, thumbnails, embed ---------------------------------------------------------------
def test_search_by_image_returns_the_case_itself_first(live, env) -> None:
    r = live.post("/v1/search", files={"file": ("q.jpg", env.images[5].read_bytes())},
                  data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "image" and len(body["hits"]) == 4
    top = body["hits"][0]
    assert top["id"] == env.ids[5] and top["score"] == pytest.approx(1.0, abs=1e-3)
    assert top["same_image"] and not any(h["same_image"] for h in body["hits"][1:])
    assert all(h["split"] == h["payload"]["split"] for h in body["hits"])
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]),
                                                        reverse=True)
    for hit in body["hits"]:
        assert no_absolute_paths(hit["payload"]), hit["payload"]
        assert (env.image_root / hit["payload"]["image"]).is_file()
        assert set(hit["labels"]) >= {"urgency", "erythema"}


def test_search_by_text_with_filters(live, env) -> None:
    r = live.post("/v1/search", json={"text": "an infected wound with redness", "k": 6,
                                      "where": ["labels.urgency=needs attention"]})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and all(h["labels"]["urgency"] == "needs attention" for h in hits)
    form = live.post("/v1/search", data={"text": "a healing wound", "k": "5",
                                         "where": ["labels.urgency!=needs attention",
                                                   "split!=nothing"]})
    assert form.status_code == 200, form.text
    assert form.json()["query"] == "text" and len(form.json()["hits"]) == 5
    assert all(h["labels"]["urgency"] != "needs attention" for h in form.json()["hits"])


def test_thumbnails_only_serve_indexed_images(live, env) -> None:
    hit = live.post("/v1/search", json={"text": "wound", "k": 1}).json()["hits"][0]
    assert hit["thumbnail"], "the image root should be known from the model's spec"
    r = live.get(hit["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 160
    by_row = live.get(f"/v1/cases/{hit['id']}/thumbnail")
    assert by_row.status_code == 200 and by_row.content == r.content
    for bad in ("..%2F..%2Fetc%2Fpasswd", "nope", "%2Fetc%2Fpasswd"):
        assert live.get(f"/v1/cases/{bad}/thumbnail").status_code == 404


def test_thumbnail_outside_the_image_root_is_a_clear_403(env, tmp_path) -> None:
    import os

    from starlette.testclient import TestClient

    from medsig.index.store import point_id

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "ok.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    images = {"a": "ok.png", "b": "../secret.png", "c": "link.png",
              "d": str(tmp_path / "secret.png")}
    by_pid = {point_id(k): SimpleNamespace(payload={"image": v}) for k, v in images.items()}

    class Store:  # an index whose payloads point inside and outside the root
        collection = "x"

        def get(self, pid, with_vectors):
            return by_pid.get(pid)

    app = create_app(env.predictor, settings=ServeSettings(api_key=None, image_root=root))
    app.state.medsig.store = Store()
    with TestClient(app) as client:
        assert client.get("/v1/cases/a/thumbnail").status_code == 200
        for case in "bcd":
            body = expect_error(client.get(f"/v1/cases/{case}/thumbnail"), 403, "outside_root")
            assert "outside the server's image root" in body["error"]["message"]


def test_embed_image_and_text(live, env) -> None:
    img = live.post("/v1/embed", files={"file": ("a.jpg", env.images[0].read_bytes())}).json()
    assert img["input"] == "image" and img["dim"] == env.encoder.embed_dim
    assert np.linalg.norm(img["vector"]) == pytest.approx(1.0, abs=1e-4)
    text = live.post("/v1/embed", json={"text": "a red wound"}).json()
    want = env.encoder.embed_texts(["a red wound"])[0].numpy()
    assert np.asarray(text["vector"]) == pytest.approx(want, abs=1e-4)
    form = live.post("/v1/embed", data={"text": "a red wound"}).json()
    assert form["vector"] == pytest.approx(text["vector"], abs=1e-6)


# -- auth and CORS ---------------------------------------------------------------------------
def test_api_key_and_cors(env) -> None:
    settings = ServeSettings(api_key="s3cret-key", cors_origins=["http://example.test"])
    server = LiveServer(create_app(env.predictor, settings=settings))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/health").json()["auth_required"] is True
            expect_error(c.get("/v1/labels"), 401, "unauthorized")
            expect_error(c.get("/v1/labels", headers={"X-API-Key": "wrong"}), 401)
            expect_error(c.post("/v1/predict", files={"file": ("a", b"x")}), 401)
            expect_error(c.post("/v1/search", json={"text": "x"}), 401)
            assert c.get("/v1/labels", headers={"X-API-Key": "s3cret-key"}).status_code == 200
            ok = c.get("/v1/labels", headers={"Authorization": "Bearer s3cret-key",
                                              "Origin": "http://example.test"})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "http://example.test"
            other = c.get("/health", headers={"Origin": "http://evil.test"})
            assert "access-control-allow-origin" not in other.headers
            # search is off without an index: a clear 404, not a crash
            expect_error(c.post("/v1/search", json={"text": "x"},
                                headers={"X-API-Key": "s3cret-key"}), 404, "not_configured")
    finally:
        server.stop()


def test_no_cors_and_no_key_by_default(live) -> None:
    r = live.get("/v1/labels", headers={"Origin": "http://example.test"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cli_serves_a_model_folder(env) -> None:
    """`serve` (the typer command mounted as `medsig serve`) in a subprocess."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import typer; from medsig.serve.cli import serve; app = typer.Typer(); "
            "app.command()(serve); app()")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--model", str(env.model_dir), "--port", str(port),
         "--no-batching", "--max-upload-mb", "1"],
        env={**os.environ, "MEDSIG_API_KEY": "cli-key"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "medsig serve did not start"
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health["auth_required"] and not health["batching"] and not health["search"]
        headers = {"Authorization": "Bearer cli-key"}
        r = httpx.post(url + "/v1/predict", headers=headers, timeout=30,
                       files={"file": ("a.jpg", env.images[0].read_bytes())})
        assert r.status_code == 200 and r.json()["model"]["name"] == env.predictor.name
        big = httpx.post(url + "/v1/predict", headers=headers, timeout=30,
                         files={"file": ("a.jpg", b"\xff\xd8\xff" + b"0" * 1_100_000)})
        expect_error(big, 413, "too_large")
    finally:
        proc.terminate()
        proc.wait(20)
