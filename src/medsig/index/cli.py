"""`medsig index export | import`: move a collection between stores (a thin typer layer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

index_app = typer.Typer(no_args_is_help=True,
                        help="Move collections between an embedded store and a server.")
console = Console()


@index_app.command("export")
def export_cmd(
    collection: str = typer.Option(..., help="Collection name."),
    store: str = typer.Option("runs/qdrant", help="Store folder (also a legacy one) or URL."),
    out: Path = typer.Option(..., help="Output file: .zip (compact) or .jsonl (readable)."),
) -> None:
    """Write a collection's ids, vectors, payloads and metadata to one file."""
    from medsig.index.store import close_store
    from medsig.index.transfer import export_collection

    report = export_collection(store, collection, out)
    close_store(store)
    console.print(f"exported {report.points} points of '{report.collection}' to "
                  f"{report.path} in {report.seconds:.1f} s", soft_wrap=True)


@index_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="A file written by `medsig index export`."),
    store: str = typer.Option("runs/qdrant", help="Target store folder or http(s) URL."),
    collection: str | None = typer.Option(None, help="Target name (default: the exported)."),
    recreate: bool = typer.Option(False, help="Drop the target collection first."),
) -> None:
    """Load an exported collection into a store; re-running it is safe."""
    from medsig.index.store import close_store
    from medsig.index.transfer import import_collection

    report = import_collection(file, store, collection, recreate)
    close_store(store)
    console.print(f"imported {report.points} points into '{report.collection}' in "
                  f"{report.path} in {report.seconds:.1f} s", soft_wrap=True)
