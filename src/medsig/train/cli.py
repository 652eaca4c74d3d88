"""`medsig train contrastive|classify|probe CONFIG.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

from pathlib import Path

import typer

train_app = typer.Typer(no_args_is_help=True, help="Fine-tune a model (writes a model folder).")

CONFIG_ARG = typer.Argument(None, help="Training config (YAML); optional with --spec etc.")
SET_OPT = typer.Option(None, "--set", help="Override a key: --set optim.lr=1e-4 (or lr=1e-4).")
SPEC_OPT = typer.Option(None, "--spec", help="Dataset spec (YAML).")
MODEL_OPT = typer.Option(None, "--model", help="Base model: hub id or local folder.")
OUT_OPT = typer.Option(None, "--out", help="Output folder.")
RESUME_OPT = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.")


def run(objective: str, config: Path | None, sets: list[str] | None, spec: Path | None,
        model: str | None, out: Path | None, resume: bool) -> Path:
    """Merge the config file, direct flags and --set overrides, then train."""
    from medsig.train.distributed import world
    from medsig.train.loop import train

    overrides: list[str] = [f"objective={objective}"]
    for key, value in (("spec", spec), ("model", model), ("out", out)):
        if value is not None:
            overrides.append(f"{key}={Path(value).resolve() if key != 'model' else value}")
    overrides.extend(sets or [])
    path = train(config if config is not None else {}, overrides=overrides, resume=resume)
    if world()[0] == 0:  # one line under several processes
        typer.echo(f"model folder: {path}")
    return path


@train_app.command("contrastive")
def contrastive(config: Path | None = CONFIG_ARG, sets: list[str] | None = SET_OPT,
                spec: Path | None = SPEC_OPT, model: str | None = MODEL_OPT,
                out: Path | None = OUT_OPT, resume: bool = RESUME_OPT) -> None:
    """Image-text fine-tuning (sigmoid / softmax, multi-positive, SupCon, hard negatives)."""
    run("contrastive", config, sets, spec, model, out, resume)


@train_app.command("classify")
def classify(config: Path | None = CONFIG_ARG, sets: list[str] | None = SET_OPT,
             spec: Path | None = SPEC_OPT, model: str | None = MODEL_OPT,
             out: Path | None = OUT_OPT, resume: bool = RESUME_OPT) -> None:
    """Label heads on the vision tower, saved as a transformers image classifier."""
    run("classify", config, sets, spec, model, out, resume)


@train_app.command("probe")
def probe(config: Path | None = CONFIG_ARG, sets: list[str] | None = SET_OPT,
          spec: Path | None = SPEC_OPT, model: str | None = MODEL_OPT,
          out: Path | None = OUT_OPT) -> None:
    """A linear / MLP probe on frozen image embeddings (no new encoder weights)."""
    run("probe", config, sets, spec, model, out, False)
