"""README.md model card of a model folder, from its ``Artifact`` (huggingface_hub ModelCard).

The metadata follows the folder's kind: ``library_name`` transformers (classifier, full /
partial / merged image-text model), peft (LoRA adapter) or medsig (probe: torch weights read
by medsig), ``base_model`` as a hub id (omitted when the base is a local folder),
``pipeline_tag``, ``metrics`` and ``datasets``. No local absolute path is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsig.models.artifact import Artifact

OBJECTIVE_TEXT = {
    "contrastive": "image-text contrastive fine-tuning (the model stays an image-text model; "
                   "zero-shot labels via the saved prompts)",
    "classify": "supervised classification heads on the vision tower "
                "(`AutoModelForImageClassification.from_pretrained` loads it)",
    "probe": "a probe (logistic regression or small MLP) on frozen image embeddings",
    "zeroshot": "zero-shot labels from prompts",
}
LIBRARY = {"classify": "transformers", "probe": "medsig", "lora-adapter": "peft"}
PIPELINE = {"classify": "image-classification", "probe": "image-classification"}


def card_metadata(art: Artifact) -> dict[str, Any]:
    """The card's YAML metadata for a folder kind."""
    from huggingface_hub import ModelCardData

    kind = art.kind
    metrics = ["roc_auc"] if art.heads and art.objective != "contrastive" else []
    if art.objective == "contrastive":
        metrics = ["recall"]
    data = ModelCardData(
        library_name=LIBRARY.get(kind, "transformers"), base_model=art.base_hub_id,
        pipeline_tag=PIPELINE.get(kind, "zero-shot-image-classification"),
        metrics=metrics or None, datasets=[art.spec.name] if art.spec.name else None,
        tags=["medsig", "medical-imaging", kind])
    return data.to_dict()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    start = metrics.get("start") or {}
    final = metrics.get("val") or {}
    keys = [k for k in final if k.startswith("val/")] or [k for k in start if
                                                            k.startswith("val/")]
    if not keys:
        return ["No validation metrics were recorded."]
    if not start:
        return ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(final.get(k))} |"
                                                     for k in keys]
    lines = ["| metric | before training | selected checkpoint |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(start.get(k))} | {_fmt(final.get(k))} |" for k in keys]
    return lines


def _heads_table(art: Artifact) -> list[str]:
    if not art.heads:
        return []
    lines = ["", "| head | kind | classes (binary: negative, positive) | thresholds | rule |",
             "|---|---|---|---|---|"]
    for h in art.heads:
        th = ", ".join(f"{t:.3f}" for t in h.thresholds) if h.kind != "multiclass" else "argmax"
        th = th or "0.5 (not tuned)"
        lines.append(f"| {h.name} | {h.kind} | {', '.join(h.classes)} | {th} | "
                     f"{h.threshold_rule or '-'} |")
    return lines


def _settings(art: Artifact) -> list[str]:
    cfg, training = art.config, art.training
    pre = art.preprocessing
    image = (f"- Images: {'zero-padded to a square, then ' if pre.mode == 'pad' else ''}"
             f"resized to {pre.size} x {pre.size}, mean {pre.mean}, std {pre.std}")
    if art.objective == "probe":
        probe = art.probe or {}
        return [f"- Probe: {probe.get('kind')} on {probe.get('dim')}-d embeddings of the "
                f"frozen encoder `{art.encoder}`"
                + (f", C per head {probe.get('C')}" if probe.get("C") else "")
                + (f", hidden {probe.get('hidden')}, best epoch {probe.get('best_epoch')}"
                   if probe.get("hidden") else ""),
                f"- Fitted on {training.get('device')} in {training.get('seconds')} s, seed "
                f"{cfg.get('seed')}", image]
    optim, adapt = cfg.get("optim", {}), training.get("adapt", {})
    best = art.metrics.get("best", {})
    return [
        f"- Adaptation: {art.adaptation} ({_fmt(adapt.get('trainable'))} of "
        f"{_fmt(adapt.get('total'))} parameters trained)",
        f"- Steps: {training.get('steps')} (planned {training.get('planned_steps')}), "
        f"epochs {optim.get('epochs')}, batch {optim.get('batch_size')} x accumulation "
        f"{optim.get('grad_accum')}, lr {optim.get('lr')}, weight decay "
        f"{optim.get('weight_decay')}, warm-up {optim.get('warmup_ratio')}",
        f"- Precision {training.get('precision')} on {training.get('device')}, seed "
        f"{cfg.get('seed')}, {training.get('seconds')} s"
        + (", stopped early" if training.get("stopped_early") else ""), image,
        f"- Checkpoint selected by `{best.get('metric')}` ({best.get('mode')}) at step "
        f"{_fmt(best.get('step'))}"]


CLASSIFY_USAGE = """\
```python
import json, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

folder = "path/to/this/folder"
# medsig's preprocessing (pad to square, then resize): image_processing_medsig.py
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(folder).eval()
heads = json.load(open(f"{folder}/medsig.json"))["heads"]
pixels = processor(images=Image.open("image.png").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    logits = model(**pixels).logits[0]
for h in heads:
    z = logits[h["offset"]:h["offset"] + h["size"]]
    if h["kind"] == "multiclass":  # a softmax over the slice; the argmax decides
        p = z.softmax(-1).tolist()
        print(h["name"], h["classes"][max(range(len(p)), key=p.__getitem__)], p)
    else:  # binary / multilabel: a sigmoid per output, compared with the saved thresholds
        names = h["classes"][1:] if h["kind"] == "binary" else h["classes"]
        p = z.sigmoid().tolist()
        print(h["name"], {n: (round(q, 4), q >= t) for n, q, t in zip(names, p, h["thresholds"])})
```

Without `trust_remote_code=True` transformers refuses to load the processor (the model
family's own processor would resize without padding and give other numbers).
`pipeline("image-classification", model=folder, trust_remote_code=True)` applies one
activation to every output (a sigmoid here, also on multiclass slices) and ignores the
thresholds: use the lines above."""


def usage(art: Artifact) -> list[str]:
    """The few lines of plain transformers / peft / medsig code that load the folder."""
    if art.objective == "classify":
        return CLASSIFY_USAGE.splitlines()
    if art.kind == "lora-adapter":
        base = art.base_hub_id or "path/to/the/base/folder"
        return ["```python", "from peft import PeftModel", "from transformers import AutoModel",
                "", f'base = AutoModel.from_pretrained("{base}")',
                'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
                "model = model.merge_and_unload()  # optional: plain weights", "```", "",
                "`adapter_config.json` names the base"
                + (" by its hub id." if art.base_hub_id else
                   " by the absolute path it had when training ran (no hub id is known); "
                   "medsig also finds it at `" + str(art.base_model) + "` relative to this "
                   "folder.")]
    if art.objective == "probe":
        return ["```python", "from medsig.models.predictor import load_predictor",
                'predictor = load_predictor("path/to/this/folder")', "```",
                "", "`probe.safetensors` holds the probe (standardisation + linear / MLP); "
                "its encoder is `" + art.encoder + "` (relative to this folder, or a hub id)."]
    lines = ["```python", "from transformers import AutoModel, AutoProcessor", "",
             'model = AutoModel.from_pretrained("path/to/this/folder")',
             'processor = AutoProcessor.from_pretrained("path/to/this/folder")', "```"]
    if art.preprocessing.mode == "pad":
        lines += ["", "medsig zero-padded each image to a centred square (black) before "
                  "resizing; the saved processor only resizes, so pad first for the same "
                  "embeddings: `canvas = Image.new(\"RGB\", (side, side)); "
                  "canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))` "
                  "with `side = max(img.size)`. `medsig.models.predictor.load_predictor` "
                  "does this and gives the zero-shot probabilities from the saved prompts."]
    return lines


def render_card(art: Artifact, name: str = "model") -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**card_metadata(art))
    base = art.base_hub_id or "a local checkpoint"
    splits = ", ".join(f"{k} {v}" for k, v in art.split.counts.items())
    lines = [
        f"# {name}", "",
        f"Trained from {base} with medsig {art.versions.get('medsig')}: "
        f"{OBJECTIVE_TEXT.get(art.objective, '')}. Folder kind: `{art.kind}`.", "",
        "## Data", "",
        f"- Collection: **{art.spec.name}** (fingerprint `{(art.spec.fingerprint or '')[:16]}`)",
        f"- Split (by group; fingerprint `{(art.split.fingerprint or '')[:16]}`): {splits}",
        f"- Labels: {', '.join(art.labels) or 'none'}", *_heads_table(art),
        "", "## Use", "", *usage(art),
        "", "## Training settings", "", *_settings(art),
        "", "## Results (validation split)", "", *_metrics_table(art.metrics),
        "", "## Intended use and limitations", "",
        "Research and engineering use: retrieval, triage prototypes and evaluation of "
        "adaptation methods on medical images. This model is **not** a medical device and "
        "makes **no diagnostic claim**; its outputs must not drive clinical decisions. "
        "Validation numbers come from the split above only; performance on other sites, "
        "devices, populations or skin types is unknown until measured. Thresholds were "
        "chosen on the validation split and should be re-checked on held-out test data.",
        "", "Record of this folder: `medsig.json`"
        + ("; configuration `config.yaml`; per-step log `log.csv`."
           if art.history else "."), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_card(out_dir: str | Path, art: Artifact) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(render_card(art, Path(out_dir).resolve().name))
    return path
