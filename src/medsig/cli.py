"""medsig command line: a thin typer layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medsig.errors import MedsigError
from medsig.progress import make_console, print_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt SigLIP-family vision-language models to medical images.")
data_app = typer.Typer(no_args_is_help=True, help="Describe, inspect, split and generate data.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
console = make_console()


def _mount() -> None:
    """Sub-commands of the later stages (each module keeps its own options)."""
    from medsig.index.cli import index_app
    from medsig.serve.cli import serve
    from medsig.train.cli import train_app

    app.add_typer(train_app, name="train")
    app.add_typer(index_app, name="index")
    app.command("serve")(serve)
    try:
        from medsig.evaluate.cli import eval_command
    except ImportError:  # evaluation runner not installed in this build
        return
    app.command("eval")(eval_command)


_mount()


# -- data ------------------------------------------------------------------------------------
@data_app.command("inspect")
def data_inspect(spec: Path = typer.Argument(..., help="Dataset spec (YAML)."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Row and image counts, label distributions, MISSING, pos_weight and warnings."""
    from medsig.data.collection import load_collection
    from medsig.data.inspect import inspect_collection

    report = inspect_collection(load_collection(spec))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(f"[bold]{report.name}[/]: {report.rows} rows, {report.groups} groups, "
                  f"{report.images_found} images found, {len(report.images_missing)} missing or "
                  "unusable")
    if report.split_counts:
        console.print("split: " + ", ".join(f"{k} {v}" for k, v in report.split_counts.items()))
    for lab in report.labels:
        table = Table(title=f"{lab.name} ({lab.kind}), MISSING {lab.missing}",
                      title_justify="left")
        for col in ("class", "images", "groups", "pos_weight"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for cls, n in lab.counts.items():
            pw = lab.pos_weight.get(cls)
            table.add_row(cls, str(n), str(lab.groups[cls]), "" if pw is None else f"{pw:.2f}")
        print_table(console, table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


@data_app.command("split")
def data_split(
    spec: Path = typer.Argument(..., help="Dataset spec (YAML)."),
    ratios: str = typer.Option("0.7,0.15,0.15", help="train,val,test fractions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same split)."),
    out: Path | None = typer.Option(None, help="Folder for splits.csv (default: the "
                                                  "spec's folder)."),
    update_spec: bool = typer.Option(True, help="Point the spec at the new splits.csv."),
    force: bool = typer.Option(False, help="Split even if the spec names a split column."),
    duplicates: float = typer.Option(
        0.99, help="Keep near-duplicate images of different groups in one split (cosine "
                   "of model-free image signatures >= this; 0: no check)."),
) -> None:
    """Assign train/val/test by group, stratified over all labels; write the assignment."""
    from medsig.data.split import split_spec
    from medsig.errors import ConfigError

    try:
        parts = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise ConfigError(f"--ratios '{ratios}': expected three numbers like 0.7,0.15,0.15"
                          ) from None
    done = split_spec(spec, parts, seed=seed, out_dir=out, update_spec=update_spec,  # type: ignore[arg-type]
                      force=force, duplicates=duplicates)
    if done.duplicates is not None:
        _print_duplicates(done)
    counts = done.result.counts()
    console.print(f"split (seed {seed}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    console.print(f"wrote {done.splits_path} and {done.report_path}")
    for w in done.label_conflicts:
        console.print(f"[yellow]warning:[/] {w} (each group stays in one split)")


def _print_duplicates(done) -> None:
    table, threshold = done.duplicates, done.duplicate_threshold
    unread = f" ({done.unreadable} unreadable images not checked)" if done.unreadable else ""
    if table.empty:
        console.print(f"near-duplicate images in different groups (cosine >= {threshold}): "
                      f"none{unread}", highlight=False)
        return
    first = table.iloc[0]
    joined = len(set(table["group"]) | set(table["duplicate_group"]))
    console.print(f"[yellow]warning:[/] {len(table)} near-duplicate image pair(s) in different "
                  f"groups (cosine >= {threshold}), e.g. '{first['id']}' ({first['group']}) ~ "
                  f"'{first['duplicate_id']}' ({first['duplicate_group']}): their {joined} "
                  f"groups are kept in one split; all pairs in {done.duplicates_file}{unread}",
                  highlight=False)


@data_app.command("synth")
def data_synth(
    kind: str = typer.Option("derm", help="derm | wound | radiology"),
    out: Path = typer.Option(..., help="Output folder."),
    n: int | None = typer.Option(None, help="Number of images (default per kind)."),
    seed: int = typer.Option(0, help="Random seed."),
    image_size: int = typer.Option(128, help="Image side in pixels."),
) -> None:
    """Generate a labelled dataset (images, table, spec) that mimics real medical data."""
    from medsig.data.synth import synthesize

    path = synthesize(kind, out, n=n, seed=seed, image_size=image_size)
    console.print(f"wrote {path}")


# -- models ----------------------------------------------------------------------------------
@model_app.command("tiny")
def model_tiny(
    out: Path = typer.Option(..., help="Output folder."),
    arch: str = typer.Option("siglip", help="siglip | siglip2 (NaFlex) | clip | vit"),
    image_size: int = typer.Option(64, help="Input resolution."),
    seed: int = typer.Option(0, help="Random seed."),
    like: str | None = typer.Option(None, help="Hub id whose real architecture to copy "
                                               "(e.g. google/medsiglip-448)."),
    layers: int | None = typer.Option(None, help="--like: layers per tower (default: real)."),
    hidden: int | None = typer.Option(None, help="--like: narrower width (fast tests)."),
) -> None:
    """Write a randomly initialised checkpoint that plain transformers loads: tiny, or with
    a public model's architecture (--like)."""
    from medsig.models.tiny import write_like, write_tiny

    if like:
        path = write_like(out, like, layers=layers, hidden_size=hidden, seed=seed)
    else:
        path = write_tiny(out, arch=arch, image_size=image_size, seed=seed)
    console.print(f"wrote {path}")


@model_app.command("safety")
def model_safety(
    model: Path = typer.Argument(..., help="Model folder (medsig.json with heads)."),
    spec: Path | None = typer.Option(None, help="Dataset spec (default: the model's)."),
    alpha: float = typer.Option(0.1, help="Conformal error rate of every label."),
    false_reject: float = typer.Option(0.05, help="Share of in-distribution val images "
                                                   "the OOD gate may refuse."),
    seed: int = typer.Option(0, help="Split seed when the spec has no split."),
) -> None:
    """(Re)fit calibration, conformal sets and the OOD gate of a model folder on its split
    (training does this already; use it for older folders or another alpha)."""
    from medsig.train.safety import fit_safety

    s = fit_safety(model, spec, alpha, false_reject, seed)
    gate = f"threshold {s.ood.threshold:.4f}" if s.ood is not None else "none"
    console.print(f"{model}: calibration for {len(s.calibration)} labels, conformal "
                  f"alpha {alpha} for {len(s.conformal)}, OOD gate {gate} "
                  f"(val false-reject target {false_reject:.0%})")


@model_app.command("blend")
def model_blend(
    base: str = typer.Argument(..., help="The model the fine-tune started from (folder or id)."),
    tuned: Path = typer.Argument(..., help="The fine-tuned model folder (full, partial, LoRA)."),
    alpha: list[str] = typer.Option(["0.25,0.5,0.75"], help="Weight of the fine-tune, 0..1 "
                                    "(repeat or comma-separate)."),
    out: Path = typer.Option(..., help="Output folder: one alpha-X.XX model folder per alpha."),
    select: Path | None = typer.Option(None, help="A spec naming a retention check: evaluate "
                                       "every alpha on val and pick one."),
    metric: str = typer.Option("classification/macro_auc", help="In-domain metric for --select."),
    split: str = typer.Option("val", help="Split to choose on (never test)."),
    n_boot: int = typer.Option(200, help="Bootstrap resamples for --select."),
) -> None:
    """Interpolate a fine-tune with its base model (WiSE-FT) against forgetting."""
    from medsig.models.blend import blend, parse_alphas

    alphas = parse_alphas(alpha)
    if select is None:
        for folder in blend(base, tuned, alphas, out):
            console.print(f"wrote {folder}")
        return
    from medsig.evaluate.blending import choose_alpha
    from medsig.evaluate.figures import fmt_ci
    from medsig.evaluate.retention import ratio_text

    res = choose_alpha(select, base, str(tuned), alphas, out, metric, split, n_boot=n_boot)
    for row in res["rows"]:
        console.print(f"alpha {row['alpha']:.2f}: {metric} {fmt_ci(row['in_domain'])} (gain "
                      f"kept {ratio_text(row['gain_kept'], row['gain_kept_ci'])}), retention "
                      f"{fmt_ci(row['retention'])} (retained "
                      f"{ratio_text(row['retained'], row['retained_ci'])}, drop recovered "
                      f"{ratio_text(row['drop_recovered'], row['drop_recovered_ci'])})")
    pick = res["choice"]
    note = "" if pick["meets"] else " (no alpha meets both 90 % targets: best compromise)"
    console.print(f"chosen on {split}: alpha {pick['alpha']}{note}; "
                  f"{out / 'blend_selection.json'}")


# -- index -----------------------------------------------------------------------------------
@app.command("embed")
def embed(
    spec: Path = typer.Argument(..., help="Dataset spec (YAML)."),
    model: str = typer.Option(..., help="Hub id or local folder."),
    store: str = typer.Option("runs/qdrant", help="Qdrant local path or http(s) URL."),
    collection: str | None = typer.Option(None, help="Collection name (default: spec name)."),
    batch_size: int | None = typer.Option(
        None, help="Images per batch (default: 256 on CUDA, 64 otherwise)."),
    limit: int | None = typer.Option(None, help="Only the first N rows."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | mps"),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp16 without bf16, fp32 "
                                   "on CPU) | fp32 | bf16 | fp16."),
    workers: int | None = typer.Option(None, help="Image decoding workers."),
    recreate: bool = typer.Option(False, help="Drop the collection first."),
    processes: int = typer.Option(1, min=1, help="Processes sharing the rows (on this "
                                  "machine; or launch with torchrun / accelerate launch)."),
) -> None:
    """Embed every image (and its text) into Qdrant with all metadata; resumable."""
    if processes > 1:
        from medsig.index.sharded import check_not_launched, launch

        check_not_launched(processes)
        args = ["embed", str(spec), "--model", model, "--store", store, "--precision", precision]
        for flag, value in [("--collection", collection), ("--batch-size", batch_size),
                            ("--limit", limit), ("--device", device), ("--workers", workers)]:
            args += [flag, str(value)] if value is not None else []
        command = [sys.executable, "-m", "medsig.cli", *args, *["--recreate"] * recreate]
        raise typer.Exit(launch(command, processes))
    from medsig.index.runner import embed_collection
    from medsig.index.sharded import leave_process_group
    from medsig.index.store import close_store
    from medsig.models.device import inference_settings

    batch_size = inference_settings(precision, batch_size, device)
    try:
        report = embed_collection(spec, model, store, collection, batch_size, limit, device,
                                  workers, recreate)
    finally:  # closed now, not by Qdrant's __del__ at interpreter exit (it prints a traceback)
        close_store(store)
    leave_process_group()
    if report.rank == 0:
        _print_embed_report(report)


def _print_embed_report(report) -> None:
    s = report.seconds
    console.print(f"[bold]{report.collection}[/]: {report.embedded} embedded, "
                  f"{report.already_indexed} already indexed, "
                  f"{sum(report.skipped.values())} skipped, {report.points_after} points in "
                  f"{report.store}")
    summed = f" (stages summed over {report.processes} processes)" * (report.processes > 1)
    console.print(f"{report.images_per_second:.1f} images/s; seconds: total "
                  f"{s.get('total', 0):.1f}{summed}, waiting for images "
                  f"{s.get('read_wait', 0):.1f}, "
                  f"model {s.get('model', 0) + s.get('device_wait', 0):.1f}, writing "
                  f"(background) {s.get('write', 0):.1f}, building the search index "
                  f"{s.get('index', 0):.1f}; first batch after {s.get('first_batch', 0):.1f}")
    for reason, n in report.skipped.items():
        console.print(f"[yellow]skipped {n} ({reason})[/]")
    for message in report.skipped_examples[:5]:
        console.print(f"  {message}")


@app.command("search")
def search_cmd(
    image: Path | None = typer.Option(None, help="Query image file."),
    text: str | None = typer.Option(None, help="Query text."),
    id: str | None = typer.Option(None, "--id", help="Query by an indexed row id."),
    collection: str = typer.Option(..., help="Collection name."),
    store: str = typer.Option("runs/qdrant", help="Qdrant local path or URL."),
    model: str | None = typer.Option(None, help="Model (default: the one that indexed)."),
    where: list[str] | None = typer.Option(None, help="Filter key=value (repeatable)."),
    k: int = typer.Option(5, "-k", help="Number of results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Nearest indexed cases to an image, a text or an indexed point."""
    from medsig.index.search import search
    from medsig.index.store import close_store

    hits = search(store, collection, image=image, text=text, id=id, model=model, where=where,
                  k=k)
    close_store(store)
    if as_json:
        print(json.dumps([vars(h) for h in hits], indent=2))
        return
    table = Table()
    for col in ("#", "score", "id", "labels", "text"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        labels = "; ".join(f"{k}={v}" for k, v in h.payload.get("labels", {}).items()
                           if v not in (None, []))
        table.add_row(str(rank), f"{h.score:.3f}", str(h.payload.get("id")), labels[:80],
                      str(h.payload.get("text", ""))[:60])
    print_table(console, table)


# -- demo ------------------------------------------------------------------------------------
@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
         n: int = typer.Option(1200, help="Images to generate."),
         seed: int = typer.Option(0, help="Random seed.")) -> None:
    """The main job end to end on generated data, a tiny model and a local Qdrant."""
    from medsig.demo import run_demo

    run_demo(out, n=n, seed=seed, console=console)


def main() -> None:
    """Entry point: user errors become one red line and exit code 2."""
    import os

    # no "Loading weights" bar on every model load; an environment default rather than
    # transformers' switch, so that `medsig --help` does not import transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except MedsigError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
