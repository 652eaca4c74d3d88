"""The MCP server, driven by the official SDK's own client: its tools answer exactly what the
HTTP API answers for the same image."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys

import pytest
from PIL import Image

from tests.test_serve import serve_env

pytest.importorskip("mcp")

VOLATILE = {"timing"}


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return serve_env(tmp_path_factory)


def _structured(result) -> dict:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def test_assess_image_equals_v1_predict(env) -> None:
    from fastapi.testclient import TestClient
    from mcp import Client

    from medsig.serve import ServeSettings, create_app
    from medsig.serve.mcp import build_server

    app = create_app(env.predictor, store=env.store, collection=env.collection,
                     settings=ServeSettings(api_key=None))
    images = [env.images[0].read_bytes(), _blank_png()]
    with TestClient(app) as http:
        expected = [http.post("/v1/predict", files={"file": ("x", data, "image/jpeg")}).json()
                    for data in images]
        search = http.post("/v1/search", files={"file": ("x", images[0], "image/jpeg")},
                           data={"k": "3"}).json()
        labels = http.get("/v1/labels").json()
    # a second app: the first one's worker threads stop with its TestClient
    server = build_server(create_app(env.predictor, store=env.store, collection=env.collection,
                                     settings=ServeSettings(api_key=None)).state.medsig)

    async def main() -> tuple:
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            got = [_structured(await client.call_tool(
                "assess_image", {"image_base64": base64.b64encode(d).decode()}))
                for d in images]
            similar = _structured(await client.call_tool("similar_cases", {
                "image_base64": base64.b64encode(images[0]).decode(), "k": 3}))
            lab = _structured(await client.call_tool("model_labels", {}))
            bad = await client.call_tool("assess_image", {"image_base64": "bm90IGFuIGltYWdl"})
            return tools, got, similar, lab, bad

    tools, got, similar, lab, bad = asyncio.run(main())
    assert {"assess_image", "similar_cases", "model_labels"} <= set(tools)
    schema = tools["assess_image"].output_schema
    assert {"status", "ood", "labels", "summary"} <= set(schema["properties"])
    for want, have in zip(expected, got):
        assert _stable(have) == _stable(want)
    assert got[1]["status"] == "not_assessed" and got[1]["labels"] == []
    assert _stable(similar) == _stable(search) and len(similar["hits"]) == 3
    assert lab == labels
    assert bad.is_error and "not_an_image" in bad.content[0].text


def _blank_png() -> bytes:
    from io import BytesIO

    out = BytesIO()
    Image.new("RGB", (80, 80), (20, 20, 20)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow  # 8 s idle, ~30 s on a busy 2-core machine (a subprocess loads torch)
def test_medsig_serve_mcp_over_stdio(env) -> None:
    """`medsig serve --mcp` as a subprocess, through the SDK's stdio transport."""
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "medsig.cli", "serve", "--mcp", "--model",
                                      str(env.model_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = base64.b64encode(env.images[1].read_bytes()).decode()

    async def main() -> dict:
        async with Client(params, read_timeout_seconds=120) as client:
            return _structured(await client.call_tool("assess_image", {"image_base64": data}))

    body = asyncio.run(main())
    assert body["model"]["name"] == env.predictor.name
    assert "not a diagnosis" in body["summary"]
    if body["status"] != "not_assessed":
        assert [lab["name"] for lab in body["labels"]] == [h.name for h in env.predictor.heads]
