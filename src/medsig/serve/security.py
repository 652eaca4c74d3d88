"""Request hardening: API key, bounded in-memory uploads, content sniffing, JSON errors.

Uploads are read from the socket into memory with a byte limit and parsed here (not by
Starlette's form parser, which spools large files to a temporary file): images never
touch the disk.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from medsig.errors import ImageError

IMAGE_FORMATS = ("jpeg", "png", "webp", "dicom")
MAX_PARTS = 16
MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD = 1024 * 1024  # room for boundaries, headers and small fields beside the file

# status and code of each ImageError reason
IMAGE_ERRORS = {"empty": (400, "empty"), "truncated": (400, "truncated"),
                "not_an_image": (415, "not_an_image"), "too_large": (413, "too_large"),
                "unreadable": (400, "unreadable"), "missing": (422, "missing_field"),
                "not_a_file": (404, "not_found"), "outside_root": (403, "outside_root")}


class ApiError(Exception):
    """An error answered as `{"error": {"code": ..., "message": ...}}` with `status`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_image_error(cls, exc: ImageError) -> ApiError:
        status, code = IMAGE_ERRORS.get(exc.reason, (400, exc.reason))
        return cls(status, code, exc.message)


# -- API key ---------------------------------------------------------------------------------
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                           description="API key (when the server sets MEDSIG_API_KEY).")
_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token.")


def api_key_dependency(expected: Callable[[], str | None]) -> Callable[..., Any]:
    """A FastAPI dependency: 401 unless the request carries the key (when one is set)."""

    async def require_api_key(
        key: str | None = Security(_key_header),
        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    ) -> None:
        want = expected()
        if not want:
            return
        given = key or (bearer.credentials if bearer is not None else None)
        if not given or not hmac.compare_digest(given.encode("utf-8", "replace"),
                                                want.encode("utf-8")):
            raise ApiError(401, "unauthorized",
                           "missing or wrong API key: send X-API-Key or Authorization: Bearer",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


# -- bodies ----------------------------------------------------------------------------------
@dataclass
class Upload:
    """A parsed request: form fields, and at most one file held in memory."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    file: bytes | None = None
    file_field: str | None = None
    json: Any = None
    is_json: bool = False

    def first(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {int(declared)} bytes exceeds the "
                                         f"limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_file_bytes: int, file_field: str = "file",
                      allow_json: bool = False) -> Upload:
    """Parse a multipart form (one file in `file_field`) or, if allowed, a JSON body."""
    kind = media_type(request)
    if kind == "application/json" and allow_json:
        body = await read_body(request, MAX_FIELD_BYTES)
        try:
            return Upload(json=json.loads(body or b"null"), is_json=True)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "invalid_json", "the body is not valid JSON") from None
    if not kind and not await read_body(request, MAX_FIELD_BYTES):
        return Upload()  # an empty request: the route names the field it is missing
    if kind == "application/x-www-form-urlencoded":  # text fields only (no file possible)
        body = await read_body(request, MAX_FIELD_BYTES)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                              max_num_fields=MAX_PARTS)
        except (UnicodeDecodeError, ValueError):
            raise ApiError(422, "invalid_field", "the form body is not valid UTF-8 "
                                                 "url-encoded text") from None
        upload = Upload()
        for name, value in pairs:
            upload.fields.setdefault(name, []).append(value)
        return upload
    if kind != "multipart/form-data":
        expected = "multipart/form-data" + (" or application/json" if allow_json else "")
        raise ApiError(415, "unsupported_media_type",
                       f"content type '{kind or 'none'}' is not supported: send {expected}")
    body = await read_body(request, max_file_bytes + FORM_OVERHEAD)
    return parse_multipart(body, request.headers.get("content-type", ""), max_file_bytes,
                           file_field)


def parse_multipart(body: bytes, content_type: str, max_file_bytes: int,
                    file_field: str = "file") -> Upload:
    """Parse a multipart/form-data body held in memory (strict limits, no temp files)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(422, "invalid_multipart", "multipart body without a boundary")
    upload = Upload()
    state: dict[str, Any] = {"parts": 0, "headers": {}, "field": b"", "value": b""}
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise ApiError(422, "invalid_multipart", f"more than {MAX_PARTS} form parts")
        state["headers"] = {}
        current.clear()
        current.update(name=None, filename=None, data=[], size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        disposition = state["headers"].get(b"content-disposition", b"")
        _, opts = parse_options_header(disposition)
        name = opts.get(b"name")
        if name is None:
            raise ApiError(422, "invalid_multipart", "a form part has no name")
        current["name"] = name.decode("utf-8", "replace")
        filename = opts.get(b"filename")
        current["filename"] = filename.decode("utf-8", "replace") if filename is not None \
            else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["size"] += end - start
        is_file = current["name"] == file_field
        if is_file and current["size"] > max_file_bytes:
            raise ApiError(413, "too_large",
                           f"upload exceeds the limit of {max_file_bytes} bytes")
        if not is_file and current["size"] > MAX_FIELD_BYTES:
            raise ApiError(413, "too_large", f"form field '{current['name']}' is too long")
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        data = b"".join(current["data"])
        if current["name"] == file_field:
            if upload.file is not None:
                raise ApiError(422, "invalid_multipart", f"more than one '{file_field}' part")
            upload.file, upload.file_field = data, file_field
            return
        if current["filename"] is not None:  # a file sent under another field name
            raise ApiError(422, "missing_field", f"unexpected file part '{current['name']}': "
                                                 f"send the image as form field '{file_field}'")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_field",
                           f"form field '{current['name']}' is not UTF-8 text") from None
        upload.fields.setdefault(current["name"], []).append(text)

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                 "on_part_end": on_part_end, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise ApiError(422, "invalid_multipart",
                       f"malformed multipart body: {str(exc).splitlines()[0][:120]}") from None
    return upload


def sniff_image(data: bytes) -> str:
    """The image format from the bytes (never the file name or content type)."""
    from medsig.data.images import sniff_format

    if not data:
        raise ApiError(400, "empty", "the uploaded file is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "not_an_image",
                       "the upload is not a JPEG, PNG, WebP or DICOM image")
    if fmt not in IMAGE_FORMATS:
        raise ApiError(415, "unsupported_format",
                       f"{fmt} images are not supported: send JPEG, PNG, WebP or DICOM")
    return fmt
