"""`medsig serve`: run the HTTP API and web page with uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


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
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for a batch to fill, in ms."),
    device: str | None = typer.Option(None, help="Device of a separately loaded index "
                                                 "encoder: auto | cpu | cuda | mps."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    mcp: bool = typer.Option(False, "--mcp", help="Serve the assessment as Model Context "
                                                  "Protocol tools on stdio (for an LLM "
                                                  "orchestrator) instead of HTTP."),
) -> None:
    """Serve predictions, similar cases and a web page (API key: env MEDSIG_API_KEY)."""
    from medsig.serve.state import ServeSettings

    settings = ServeSettings(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=int(max_megapixels * 1_000_000), batching=batching, max_batch=max_batch,
        max_wait_ms=max_wait_ms, cors_origins=list(cors_origin or []), image_root=image_root,
        device=device)
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
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
