"""The model folder a training run leaves: its ``medsig.json`` record and model card.

Both training paths (the accelerate loop and the probe) write through ``write_outputs``, so
the folder holds the same ``medsig.models.artifact.Artifact`` whatever trained it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsig.models.artifact import (
    Artifact,
    DataRef,
    Preprocessing,
    SplitRef,
    adaptation_of,
    reference,
    write_adapter_base,
)
from medsig.models.heads import heads_of


def portable_config(cfg: Any, out: Path) -> dict[str, Any]:
    """The run's config with its paths relative to the output folder (hub ids unchanged)."""
    raw = cfg.to_dict()
    for key in ("spec", "model"):
        if raw.get(key):
            raw[key] = reference(raw[key], out)
    raw["out"] = "."
    return raw


def build_artifact(cfg: Any, out: Path, collection: Any, counts: dict[str, int],
                   heads: list[Any], preprocess: Any, *, prompts: dict | None = None,
                   metrics: dict | None = None, training: dict | None = None,
                   probe: dict | None = None, split_note: str | None = None,
                   encoder: str = ".") -> Artifact:
    """The record of a run's output folder ``out`` (paths relative to ``out``)."""
    from medsig.train.data import spec_fingerprint, split_fingerprint

    spec = collection.spec
    adaptation = "frozen" if cfg.objective == "probe" else adaptation_of(cfg.adapt)
    return Artifact(
        objective=cfg.objective, base_model=reference(cfg.model, out), adaptation=adaptation,
        encoder=encoder, preprocessing=Preprocessing.of(preprocess), heads=heads_of(heads),
        labels=[h.name for h in heads_of(heads)], prompts=dict(prompts or {}),
        spec=DataRef(spec.name, reference(spec.path, out) if spec.path else None,
                     spec_fingerprint(collection)),
        split=SplitRef(split_fingerprint(collection), dict(counts), split_note),
        metrics=dict(metrics or {}), training=dict(training or {}),
        config=portable_config(cfg, out), probe=probe,
        history="log.csv" if cfg.objective != "probe" else None)


def write_outputs(out: Path, artifact: Artifact) -> Artifact:
    """medsig.json, the LoRA adapter's base reference and the model card."""
    from medsig.train.card import write_card

    out = Path(out)
    if artifact.adaptation == "lora-adapter" and artifact.base_model:
        write_adapter_base(out, str(artifact.base_source(out)))
    artifact.save(out)
    write_card(out, artifact)
    return artifact
