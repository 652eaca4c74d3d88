"""The FastAPI app: predict, search, embed, labels, thumbnails, health and the web page."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsig.data.images import RootedPath, inside_root
from medsig.errors import ConfigError, ImageError, MedsigError
from medsig.index.store import point_id
from medsig.models.ood import is_blank
from medsig.models.saliency import DEFAULT_METHOD as DEFAULT_SALIENCY
from medsig.models.saliency import METHODS as SALIENCY_METHODS
from medsig.serve import safe
from medsig.serve import schemas as S
from medsig.serve.batching import QueueFull
from medsig.serve.limits import ConcurrencyLimit
from medsig.serve.security import ApiError, Upload, api_key_dependency, read_upload, sniff_image
from medsig.serve.state import ServeSettings, ServeState, load_state, resolve_image, scrub_paths
from medsig.serve.summary import case_labels, label_results, same_image, summarize

log = logging.getLogger("medsig.serve")
STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
ERRORS = {code: {"model": S.ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}
_IMAGE_PART = {"type": "string", "format": "binary",
               "description": "JPEG, PNG, WebP or DICOM (format sniffed from the bytes)."}


def _body(required: list[str], props: dict[str, Any], json_model: Any = None) -> dict:
    form: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        form["required"] = required
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}}
    if json_model is not None:
        content["application/json"] = {"schema": json_model.model_json_schema()}
    return {"requestBody": {"required": True, "content": content}}


def create_app(model: Any, store: str | Path | None = None, collection: str | None = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """The app for a trained model folder (or a loaded Predictor), optionally with an index."""
    settings = settings or ServeSettings()
    state = load_state(model, store, collection, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await state.close()

    app = FastAPI(title="medsig", version=state.model.version, lifespan=lifespan,
                  description="Label probabilities, decisions, findings summaries and "
                              "similar cases for medical images. Not a diagnosis.")
    app.state.medsig = state
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrency)  # outermost
    _install_error_handlers(app)
    auth = [Depends(api_key_dependency(lambda: settings.api_key))]
    _add_routes(app, state, auth)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# -- errors ----------------------------------------------------------------------------------
def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(_: Request, exc: ImageError) -> JSONResponse:
        err = ApiError.from_image_error(exc)
        return _error(err.status, err.code, err.message)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(MedsigError)
    async def medsig_error(_: Request, exc: MedsigError) -> JSONResponse:
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, str(exc)[:200])
        return _error(500, "internal_error", "internal server error")


# -- helpers ---------------------------------------------------------------------------------
def _decode(state: ServeState, data: bytes, preprocess: Any, size: int | None) -> Any:
    """Bytes -> preprocessed pixels (runs in a thread pool; nothing touches the disk)."""
    from medsig.data.images import load_image

    image = load_image(data, max_pixels=state.settings.max_pixels, draft_size=size)
    return preprocess(image), is_blank(image)


async def _pixels(state: ServeState, data: bytes, preprocess: Any, size: int | None
                  ) -> tuple[Any, str, float, bool]:
    if len(data) > state.settings.max_upload_bytes:
        raise ApiError(413, "too_large", f"upload exceeds {state.settings.max_upload_bytes} "
                                         "bytes")
    fmt = sniff_image(data)
    start = time.perf_counter()
    pixels, blank = await run_in_threadpool(_decode, state, data, preprocess, size)
    return pixels, fmt, (time.perf_counter() - start) * 1000, blank


def _timing(start: float, decode_ms: float, info: Any) -> S.Timing:
    return S.Timing(decode_ms=round(decode_ms, 2), total_ms=round(
        (time.perf_counter() - start) * 1000, 2), inference_ms=round(
        info.wait_ms + info.model_ms, 2), batch_size=info.size)


def _field_int(upload: Upload, name: str, default: int, low: int, high: int) -> int:
    raw = upload.first(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid_field", f"'{name}' must be an integer") from None
    if not low <= value <= high:
        raise ApiError(422, "invalid_field", f"'{name}' must be between {low} and {high}")
    return value


def _json_query(upload: Upload, model: Any) -> Any:
    try:
        return model.model_validate(upload.json)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None


def _require_file(upload: Upload) -> bytes:
    if upload.file is None:
        raise ApiError(422, "missing_field", "the image must be sent in the form field 'file'")
    return upload.file


def _embedder(state: ServeState):
    if state.embedder is None:
        raise ApiError(404, "not_configured", "this model has no embedding encoder")
    return state.embedder


async def assess(state: ServeState, data: bytes, explain: bool = False,
                 explain_method: str | None = None) -> S.PredictResponse:
    """The /v1/predict answer for one image (also the MCP tool's): calibrated findings,
    conformal states, and none at all when the OOD gate refuses the image."""
    start = time.perf_counter()
    predictor = state.predictor
    pixels, fmt, decode_ms, blank = await _pixels(state, data, predictor.preprocess,
                                                  getattr(predictor.preprocess, "size", None))
    row, info = await state.batcher("predict", safe.outputs_fn(predictor)).submit(pixels)
    probs, ood_values = safe.split_row(row)
    ood = safe.ood_result(predictor, ood_values, blank)
    results = safe.with_sets(predictor, state.heads, label_results(state.heads, probs), probs)
    status = safe.status_of(results, ood)
    if status == "not_assessed":
        results, summary = [], safe.not_assessed_summary(state.model.name, state.model.version,
                                                         ood)  # type: ignore[arg-type]
    else:
        summary = summarize(results, state.model.name, state.model.version)
        if explain:
            results = await asyncio.get_running_loop().run_in_executor(
                state.executor,
                partial(safe.explain, predictor, state.heads, pixels, results, probs,
                        explain_method))
    return S.PredictResponse(model=state.model, status=status, ood=ood, labels=results,
                             summary=summary, image=S.ImageInfo(format=fmt, bytes=len(data)),
                             timing=_timing(start, decode_ms, info))


async def find_similar(state: ServeState, data: bytes | None, text: str | None, k: int,
                       where: list[str], using: str, start: float | None = None
                       ) -> S.SearchResponse:
    """The /v1/search answer (also the MCP tool's): the k nearest indexed cases."""
    start = time.perf_counter() if start is None else start
    if state.store is None:
        raise ApiError(404, "not_configured", "search is off: start the server with "
                                              "--store and --collection")
    vector, decode_ms, info = await _embed(state, data, text)
    flt = _filter(where)
    if using not in state.vector_names:
        raise ApiError(422, "invalid_field", f"the index has no '{using}' vectors")
    try:
        hits = await asyncio.get_running_loop().run_in_executor(
            state.store_executor, partial(state.store.search, vector, using, k, flt))
    except (ValueError, TypeError, KeyError) as exc:
        raise ApiError(422, "invalid_filter", f"filter rejected: {str(exc)[:160]}") from None
    return S.SearchResponse(
        query="text" if data is None else "image", collection=state.store.collection, k=k,
        where=where, hits=[_hit(state, rank, h, data is not None)
                           for rank, h in enumerate(hits, 1)],
        timing=_timing(start, decode_ms, info))


# -- routes ----------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServeState, auth: list) -> None:
    """Every route, by group: the page and service facts, the model, search, thumbnails."""
    _add_service_routes(app, state, auth)
    _add_model_routes(app, state, auth)
    _add_search_routes(app, state, auth)
    _add_thumbnail_route(app, state, auth)


def _add_service_routes(app: FastAPI, state: ServeState, auth: list) -> None:
    settings = state.settings

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/health", response_model=S.HealthResponse, tags=["service"])
    async def health() -> S.HealthResponse:
        """Liveness and what this server offers (no API key needed)."""
        return S.HealthResponse(status="ok", model=state.model, search=state.store is not None,
                                thumbnails=state.image_root is not None,
                                auth_required=bool(settings.api_key),
                                batching=settings.batching,
                                uptime_s=round(time.time() - state.started, 1))

    @app.get("/v1/labels", response_model=S.LabelsResponse, dependencies=auth,
             responses=ERRORS, tags=["model"])
    async def labels() -> S.LabelsResponse:
        """The model's heads: classes (readable states) and saved thresholds."""
        return S.LabelsResponse(model=state.model,
                                heads=safe.head_infos(state.predictor, state.heads),
                                ood=safe.ood_info(state.predictor))


# multipart bodies are read by medsig.serve.security (size-limited, sniffed), not by FastAPI:
# their OpenAPI description is declared here
_PREDICT_OPENAPI = {**_body(["file"], {"file": _IMAGE_PART}), "parameters": [
    {"name": "explain", "in": "query", "required": False,
     "schema": {"type": "boolean", "default": False},
     "description": "Add a saliency overlay (base64 PNG) per label."},
    {"name": "explain_method", "in": "query", "required": False,
     "schema": {"type": "string", "enum": list(SALIENCY_METHODS),
                "default": DEFAULT_SALIENCY},
     "description": "How the overlay is computed: auto (default: occlusion on a GPU or for "
                    "a small vision tower, rollout for a large one on a CPU), occlusion "
                    "(225 forward passes), gradcam or rollout (one backward pass)."}]}


def _add_model_routes(app: FastAPI, state: ServeState, auth: list) -> None:
    @app.post("/v1/predict", response_model=S.PredictResponse, dependencies=auth,
              responses=ERRORS, tags=["model"], openapi_extra=_PREDICT_OPENAPI)
    async def predict(request: Request) -> S.PredictResponse:
        """Per-label probabilities, decisions at the saved thresholds, conformal states, the
        out-of-distribution gate and a summary."""
        upload = await read_upload(request, state.settings.max_upload_bytes)
        explain = request.query_params.get("explain", "false").lower() in ("1", "true", "yes")
        method = request.query_params.get("explain_method") or None
        if method is not None and method not in SALIENCY_METHODS:
            raise ApiError(422, "invalid_field", "'explain_method' must be one of "
                           f"{', '.join(SALIENCY_METHODS)}")
        return await assess(state, _require_file(upload), explain, method)


def _search_openapi(max_k: int) -> dict[str, Any]:
    props = {"file": _IMAGE_PART, "text": {"type": "string", "maxLength": 2000},
             "k": {"type": "integer", "minimum": 1, "maximum": max_k, "default": 5},
             "where": {"type": "array", "items": {"type": "string"}},
             "using": {"type": "string", "enum": ["image", "text"]}}
    return _body([], props, S.SearchQuery)


_EMBED_OPENAPI = _body([], {"file": _IMAGE_PART, "text": {"type": "string", "maxLength": 2000}},
                       S.EmbedQuery)


def _add_search_routes(app: FastAPI, state: ServeState, auth: list) -> None:
    settings = state.settings
    not_found = {**ERRORS, 404: {"model": S.ErrorResponse}}

    @app.post("/v1/search", response_model=S.SearchResponse, dependencies=auth,
              responses=not_found, tags=["search"],
              openapi_extra=_search_openapi(settings.max_k))
    async def search(request: Request) -> S.SearchResponse:
        """The k most similar indexed cases to an image (form) or a text (form or JSON)."""
        start = time.perf_counter()
        if state.store is None:
            raise ApiError(404, "not_configured", "search is off: start the server with "
                                                  "--store and --collection")
        upload = await read_upload(request, settings.max_upload_bytes, allow_json=True)
        text, k, where, using = _search_query(upload, settings.max_k)
        return await find_similar(state, upload.file, text, k, where, using, start)

    @app.post("/v1/embed", response_model=S.EmbedResponse, dependencies=auth,
              responses=not_found, tags=["search"], openapi_extra=_EMBED_OPENAPI)
    async def embed(request: Request) -> S.EmbedResponse:
        """The L2-normalised embedding of an image or a text."""
        start = time.perf_counter()
        upload = await read_upload(request, settings.max_upload_bytes, allow_json=True)
        text = (_json_query(upload, S.EmbedQuery).text if upload.is_json
                else _one_of_file_or_text(upload))
        vector, decode_ms, info = await _embed(state, upload.file, text)
        return S.EmbedResponse(input="text" if upload.file is None else "image",
                               model=_embedder(state).name, dim=int(vector.shape[0]),
                               vector=[round(float(x), 7) for x in vector],
                               timing=_timing(start, decode_ms, info))


def _one_of_file_or_text(upload: Any) -> str | None:
    """The form's text field; exactly one of 'file' and 'text' must be sent."""
    text = upload.first("text") or None
    if (upload.file is None) == (text is None):
        raise ApiError(422, "missing_field", "send exactly one of the form fields 'file' or "
                                             "'text'")
    return text


def _search_query(upload: Any, max_k: int) -> tuple[str | None, int, list[str], str]:
    """(text, k, where, using) of a search request, from JSON or from the form."""
    if upload.is_json:
        q = _json_query(upload, S.SearchQuery)
        return q.text, q.k, q.where, q.using
    text = _one_of_file_or_text(upload)
    k = _field_int(upload, "k", 5, 1, max_k)
    where = [w for w in upload.fields.get("where", []) if w.strip()]
    using = upload.first("using") or "image"
    if using not in ("image", "text"):
        raise ApiError(422, "invalid_field", "'using' must be image or text")
    return text, k, where, using


def _add_thumbnail_route(app: FastAPI, state: ServeState, auth: list) -> None:
    @app.get("/v1/cases/{case_id}/thumbnail", dependencies=auth, tags=["search"],
             responses={**ERRORS, 404: {"model": S.ErrorResponse},
                        200: {"content": {"image/jpeg": {}}}},
             response_class=Response)
    async def thumbnail(case_id: str) -> Response:
        """A small JPEG of an indexed case (by point id or row id)."""
        if state.store is None or state.image_root is None:
            raise ApiError(404, "not_configured", "thumbnails need an index and its image root")
        path = await _case_image(state, case_id)
        data = await run_in_threadpool(_thumbnail, state, path)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})


async def _case_image(state: ServeState, case_id: str) -> Path:
    """The image file of an indexed case, inside the server's image root."""
    try:
        pid = str(uuid.UUID(case_id))
    except ValueError:
        pid = point_id(case_id)
    point = await asyncio.get_running_loop().run_in_executor(
        state.store_executor, partial(state.store.get, pid, False))
    rel = None if point is None else (point.payload or {}).get("image")
    path = None if point is None else resolve_image(state.image_root, rel)
    if path is None and isinstance(rel, str) and rel and "\x00" not in rel \
            and not inside_root(state.image_root / rel, state.image_root):
        raise ApiError(403, "outside_root", f"the image of case '{case_id[:80]}' lies "
                                            "outside the server's image root")
    if path is None:
        raise ApiError(404, "not_found", f"no image for case '{case_id[:80]}'")
    return path


async def _embed(state: ServeState, data: bytes | None, text: str | None
                 ) -> tuple[np.ndarray, float, Any]:
    emb = _embedder(state)
    if data is not None:
        pixels, _, decode_ms, _ = await _pixels(state, data, emb.preprocess, emb.image_size)
        row, info = await state.batcher("embed_image", emb.image).submit(pixels)
        return np.asarray(row, dtype=np.float32), decode_ms, info
    if emb.text is None:
        raise ApiError(422, "text_not_supported", f"model '{emb.name}' has no text encoder")
    text = (text or "").strip()
    if not text:
        raise ApiError(422, "invalid_field", "'text' is empty")
    row, info = await state.batcher("embed_text", emb.text, texts=True).submit(text[:2000])
    return np.asarray(row, dtype=np.float32), 0.0, info


def _filter(where: list[str]) -> Any:
    from medsig.index.search import parse_where

    if len(where) > 16:
        raise ApiError(422, "invalid_filter", "at most 16 filters")
    try:
        return parse_where(where)
    except ConfigError as exc:
        raise ApiError(422, "invalid_filter", exc.message) from None


def _hit(state: ServeState, rank: int, hit: Any, image_query: bool) -> S.SearchHit:
    payload = scrub_paths(hit.payload, state.image_root)
    thumb = None
    if state.image_root is not None and resolve_image(state.image_root, payload.get("image")):
        thumb = f"/v1/cases/{hit.id}/thumbnail"
    split = payload.get("split")
    return S.SearchHit(rank=rank, id=str(payload.get("id", hit.id)), point_id=hit.id,
                       score=round(float(hit.score), 6),
                       same_image=same_image(hit.score, image_query),
                       split=None if split is None else str(split),
                       labels=case_labels(payload.get("labels")), payload=payload,
                       thumbnail=thumb)


def _thumbnail(state: ServeState, path: Path) -> bytes:
    """A small JPEG of an indexed image (decoded at reduced size when possible)."""
    from medsig.data.images import load_image

    side = state.settings.thumbnail_size
    try:
        image = load_image(RootedPath.under(state.image_root or path.parent, path),
                           max_pixels=state.settings.max_pixels, draft_size=side)
    except ImageError as exc:
        err = ApiError.from_image_error(exc) if exc.reason == "outside_root" else None
        raise err or ApiError(404, "not_found", f"case image unavailable ({exc.reason})"
                              ) from None
    image.thumbnail((side, side))
    out = BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
