"""``medsig eval``: evaluate one or more models on a split, print a compact summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from medsig.errors import ConfigError
from medsig.evaluate import TASKS
from medsig.evaluate.figures import fmt
from medsig.progress import make_console, print_table


def parse_models(items: list[str] | None) -> dict[str, str]:
    """``["base=google/siglip-base", "ft=runs/ft"]`` -> {name: path}, order kept."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--model '{item}': expected name=path "
                              "(e.g. base=google/siglip-base-patch16-224)")
        if name in out:
            raise ConfigError(f"--model: the name '{name}' is given twice")
        out[name] = path
    if not out:
        raise ConfigError("no models to evaluate: pass --model name=path at least once")
    return out


def parse_tasks(tasks: str) -> list[str]:
    """``"retrieval,zeroshot"`` or ``"all"`` -> task names; unknown names are an error."""
    names = [t.strip().lower() for t in tasks.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none)'}; choose "
                          f"from {', '.join(TASKS)} or all")
    return list(dict.fromkeys(names))


SHORT = (("classification/macro_auc", "classify AUC"), ("zeroshot/accuracy", "0-shot acc"),
         ("zeroshot/macro_auc", "0-shot AUC"), ("retrieval/image_to_text_recall@", "i→t R@"),
         ("retrieval/text_to_image_recall@", "t→i R@"), ("clustering/nmi:", "NMI "))


def short_name(metric: str) -> str:
    for long, short in SHORT:
        if metric.startswith(long):
            return short + metric[len(long):]
    return metric


def _cell(r: dict[str, Any] | None) -> str:

    if not r or r.get("point") is None:
        return "–"
    if r.get("low") is None or r.get("high") is None:
        return fmt(r["point"])
    return f"{fmt(r['point'])} ({fmt(r['low'], 2)}–{fmt(r['high'], 2)})"


def summary_table(metrics: dict[str, Any]) -> Table:
    """Headline metrics: one column per model (point [95% CI]) and the winner."""
    models = list(metrics.get("model_order") or [])
    table = Table(title=f"{metrics['spec']['name']}: split {metrics['split']}, "
                        f"{metrics['n_rows']} images, {metrics['n_groups']} groups",
                  title_justify="left")
    table.add_column("metric", no_wrap=True)
    for m in models:
        table.add_column(m, justify="right")
    table.add_column("winner")
    for metric, per in (metrics.get("headline") or {}).items():
        w = (metrics.get("winners") or {}).get(metric) or {}
        verdict = {"clear": "", "only model": "", "not significant": " (n.s.)"}.get(
            w.get("verdict", ""), " (untested)")
        table.add_row(short_name(metric), *[_cell(per.get(m)) for m in models],
                      f"{w.get('model', '–')}{verdict}")
    return table


def duplicate_warning(metrics: dict) -> str | None:
    """One line when images of the evaluated split have a near-duplicate in another split."""
    dup = (metrics.get("leakage") or {}).get("near_duplicates") or {}
    split = metrics.get("split")
    pairs = {k: v for k, v in (dup.get("counts") or {}).items() if v and split in k.split("/")}
    if not pairs:
        return None
    other = sum((dup.get("other_group") or {}).get(k, 0) for k in pairs)
    shown = ", ".join(f"{k}: {v}" for k, v in pairs.items())
    return (f"near-duplicate images across splits ({shown}; {other} in another group, "
            f"missed by the group check) - see 'Split leakage' in the report")


def eval_command(
    spec: Path = typer.Argument(..., help="Dataset spec (YAML) with a split."),
    more: list[str] | None = typer.Argument(
        None, metavar="[NAME=PATH]...", help="More models, as after --models."),
    models: list[str] | None = typer.Option(
        None, "--models", "--model", "-m",
        help="name=path (hub id or folder): `--models base=M1 tuned=M2` or `-m base=M1 -m "
             "tuned=M2`; the first is the reference for paired differences."),
    tasks: str = typer.Option(",".join(TASKS), help="Comma-separated tasks, or 'all'."),
    split: str = typer.Option("test", help="Split to evaluate (train / val / test)."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for metrics.json, the report "
                                                     "and the embedding cache."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples (groups) per metric."),
    subgroups: list[str] | None = typer.Option(
        None, "--subgroup", "-s", help="Metadata column for subgroup tables; repeatable."),
    batch_size: int | None = typer.Option(
        None, help="Images per batch (default: 256 on CUDA, 64 otherwise)."),
    device: str | None = typer.Option(None, help="cuda | mps | cpu (default: best available)."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp16 without bf16, fp32 "
                                   "on CPU) | fp32 | bf16 | fp16."),
    duplicates: float = typer.Option(
        0.99, help="Cosine threshold of the near-duplicate image check across splits "
                   "(model-free signatures); 0 skips the check."),
) -> None:
    """Evaluate models on a split: metrics with group-bootstrap CIs, paired differences
    and an HTML report (research metrics, not a diagnostic claim)."""
    from medsig.evaluate.run import evaluate
    from medsig.models.device import inference_settings

    named = parse_models([*(models or []), *(more or [])])
    task_list = parse_tasks(tasks)
    if n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1, got {n_boot}")
    batch_size = inference_settings(precision, batch_size, device)
    if not 0 <= duplicates <= 1:
        raise ConfigError(f"--duplicates must be in [0, 1] (0: skip), got {duplicates}")
    metrics = evaluate(spec, named, task_list, split=split, out=out, batch_size=batch_size,
                       n_boot=n_boot, subgroups=subgroups or None, device=device,
                       duplicates=duplicates or None)
    console = make_console()
    warning = duplicate_warning(metrics)
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    print_table(console, summary_table(metrics))
    console.print("(95% group-bootstrap CIs; n.s. = the paired difference with the first "
                  "model is not significant)", highlight=False)
    console.print(f"report: {out / 'report.html'}  metrics: {out / 'metrics.json'}",
                  highlight=False)
