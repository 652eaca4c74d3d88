"""The assessment as Model Context Protocol tools, for an LLM orchestrator.

``medsig serve --mcp --model DIR`` runs an MCP server on stdio (official ``mcp`` SDK) with

- ``assess_image``: the /v1/predict answer for a base64 image (findings, decisions,
  calibrated probabilities, conformal states, the OOD verdict, the summary) - the same code
  and the same JSON schema (``PredictResponse``);
- ``similar_cases``: the /v1/search answer for a base64 image or a text (``SearchResponse``);
- ``model_labels``: the /v1/labels answer (heads, thresholds, conformal and OOD settings).

Errors come back as MCP tool errors carrying the API's one-line message.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from medsig.serve import schemas as S
from medsig.serve.security import ApiError

INSTRUCTIONS = (
    "medsig scores medical images with a trained model. Use assess_image for a photo: when "
    "its status is 'not_assessed' the image is unlike the training images and no finding may "
    "be reported; labels whose state is 'uncertain' need review by a clinician. The result is "
    "decision support, never a diagnosis.")


def _image(image_base64: str, limit: int) -> bytes:
    try:
        data = base64.b64decode(image_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_field", "image_base64 is not valid base64") from None
    if not data:
        raise ApiError(422, "invalid_field", "image_base64 is empty")
    if len(data) > limit:
        raise ApiError(413, "too_large", f"image exceeds {limit} bytes")
    return data


def _fail(exc: Exception) -> Exception:
    """A ToolError with the API's code and one-line message (other errors stay generic)."""
    from mcp.server.mcpserver.exceptions import ToolError

    from medsig.errors import ImageError, MedsigError

    if isinstance(exc, ApiError):
        return ToolError(f"{exc.code}: {exc.message}")
    if isinstance(exc, ImageError):
        err = ApiError.from_image_error(exc)
        return ToolError(f"{err.code}: {err.message}")
    if isinstance(exc, MedsigError):
        return ToolError(f"bad_request: {exc}")
    return exc


def build_server(state: Any) -> Any:
    """An ``MCPServer`` whose tools answer from ``state`` (a ``ServeState``)."""
    from mcp.server.mcpserver import MCPServer

    from medsig.serve.app import assess, find_similar
    from medsig.serve.safe import head_infos, ood_info

    server = MCPServer(name="medsig", instructions=INSTRUCTIONS, version=state.model.version)
    limit = state.settings.max_upload_bytes

    @server.tool(description="Assess one medical image (base64 JPEG / PNG / WebP / DICOM): "
                             "per-label findings with calibrated probabilities, conformal "
                             "state (uncertain = needs review), the out-of-distribution "
                             "verdict and a plain-text summary. Same schema as /v1/predict.")
    async def assess_image(image_base64: str, explain: bool = False,
                           explain_method: Literal["auto", "occlusion", "gradcam", "rollout"]
                           = "auto") -> S.PredictResponse:
        try:
            return await assess(state, _image(image_base64, limit), explain, explain_method)
        except Exception as exc:
            raise _fail(exc) from None

    @server.tool(description="The k most similar indexed cases to a base64 image or a text "
                             "(same schema as /v1/search).")
    async def similar_cases(image_base64: str | None = None, text: str | None = None,
                            k: int = 5, where: list[str] | None = None,
                            using: str = "image") -> S.SearchResponse:
        try:
            if (image_base64 is None) == (text is None):
                raise ApiError(422, "missing_field", "give exactly one of image_base64, text")
            if not 1 <= k <= state.settings.max_k or using not in ("image", "text"):
                raise ApiError(422, "invalid_field", f"k must be 1..{state.settings.max_k} "
                                                     "and using image or text")
            data = None if image_base64 is None else _image(image_base64, limit)
            return await find_similar(state, data, text, k, list(where or []), using)
        except Exception as exc:
            raise _fail(exc) from None

    @server.tool(description="The model's labels, thresholds, conformal error rates and the "
                             "out-of-distribution threshold (same schema as /v1/labels).")
    async def model_labels() -> S.LabelsResponse:
        return S.LabelsResponse(model=state.model, heads=head_infos(state.predictor,
                                                                    state.heads),
                                ood=ood_info(state.predictor))

    return server


def run_stdio(model: Any, store: Any = None, collection: str | None = None,
              settings: Any = None) -> None:
    """Load the model (and index) once and serve the tools on stdin / stdout."""
    from medsig.serve.state import ServeSettings, load_state

    state = load_state(model, store, collection, settings or ServeSettings())
    build_server(state).run("stdio")
