"""`medsig serve`: run the HTTP API and web page with uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from medsig.progress import make_console

console = make_console(stderr=True)


def serve(
    model: str = typer.Option(..., help="Trained model folder (medsig.json) or hub id."),
    store: str | None = typer.Option(None, help="Qdrant local path or URL (enables search)."),
    collection: str | None = typer.Option(None, help="Collection name in the store."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    image_root: Path | None = typer.Option(
        None, help="Folder of the indexed images, for thumbnails (default: from the "
                   "model's dataset spec when it matches the collection)."),
    cors_origin: list[str] | None = typer.Option(
        None, "--cors-origin", help="Allow browser calls from this origin (repeatable); "
                                    "no CORS by default."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload, in MB."),
    max_megapixels: float = typer.Option(50.0, help="Largest accepted image, in megapixels."),
    batching: bool = typer.Option(True, help="Micro-batch concurrent requests."),
    max_batch: int = typer.Option(32, help="Largest micro-batch."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for a batch to fill, in ms "
                                                "(only when several requests are waiting)."),
    max_concurrent: int = typer.Option(64, help="HTTP requests in progress at once; beyond, "
                                                "503 with Retry-After."),
    max_queue: int = typer.Option(256, help="Requests waiting for the model; beyond, 503."),
    device: str | None = typer.Option(None, help="Device of a separately loaded index "
                                                 "encoder: auto | cpu | cuda | mps."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp16 without bf16, fp32 "
                                               "on CPU) | fp32 | bf16 | fp16."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    mcp: bool = typer.Option(False, "--mcp", help="Serve the assessment as Model Context "
                                                  "Protocol tools on stdio (for an LLM "
                                                  "orchestrator) instead of HTTP."),
) -> None:
    """Serve predictions, similar cases and a web page (API key: env MEDSIG_API_KEY)."""
    from medsig.models.device import set_default_precision
    from medsig.serve.state import ServeSettings

    set_default_precision(precision)
    settings = ServeSettings(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=int(max_megapixels * 1_000_000), batching=batching, max_batch=max_batch,
        max_wait_ms=max_wait_ms, cors_origins=list(cors_origin or []), image_root=image_root,
        device=device, max_concurrency=max_concurrent, max_queue=max_queue)
    if mcp:  # stdout carries the protocol: nothing else may be printed there
        from medsig.serve.mcp import run_stdio

        run_stdio(model, store, collection, settings)
        return
    import uvicorn

    from medsig.serve.app import create_app

    app = create_app(model, store=store, collection=collection, settings=settings)
    if not settings.api_key and not _is_loopback(host):
        console.print(f"[yellow]warning:[/] listening on {host} without an API key; set "
                      "MEDSIG_API_KEY to require one")
    state = app.state.medsig
    console.print(f"model {state.model.name} {state.model.version}; search "
                  f"{'on' if state.store is not None else 'off'}; "
                  f"http://{host}:{port}/ (API docs at /docs)")
    # uvicorn's own limit (plain-text 503) only backs up the app's JSON one, for connections
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                limit_concurrency=backstop_limit(max_concurrent))


def backstop_limit(max_concurrent: int) -> int:
    """uvicorn's connection + task limit: well above the app's request limit."""
    return 4 * max_concurrent + 32


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
