"""README.md model card for a training output folder (from its medsig.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OBJECTIVE_TEXT = {
    "contrastive": "image-text contrastive fine-tuning (the model stays an image-text model: "
                   "`AutoModel.from_pretrained` loads it; zero-shot labels via the prompts)",
    "classify": "supervised classification heads on the vision tower "
                "(`AutoModelForImageClassification.from_pretrained` loads it)",
    "probe": "a probe on frozen image embeddings",
}


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
    lines = ["| metric | before training | selected checkpoint |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(start.get(k))} | {_fmt(final.get(k))} |" for k in keys]
    return lines


def render_card(info: dict[str, Any]) -> str:
    cfg = info.get("config", {})
    optim, adapt = cfg.get("optim", {}), cfg.get("adapt", {})
    training = info.get("training", {})
    best = info.get("metrics", {}).get("best", {})
    name = Path(str(cfg.get("out", "model"))).name
    heads = info.get("heads") or []
    lines = [
        "---", "library_name: transformers", "tags: [medsig, medical-imaging, "
        f"{info.get('objective')}]", f"base_model: {info.get('base_model')}", "---", "",
        f"# {name}", "",
        f"Fine-tuned from `{info.get('base_model')}` with medsig "
        f"{info.get('medsig_version')}: {OBJECTIVE_TEXT.get(info.get('objective', ''), '')}.",
        "", "## Data", "",
        f"- Collection: **{info['spec']['name']}** (spec `{info['spec']['path']}`, "
        f"fingerprint `{info['spec']['fingerprint'][:16]}`)",
        f"- Split (by group; fingerprint `{info['split']['fingerprint'][:16]}`): "
        + ", ".join(f"{k} {v}" for k, v in info["split"]["counts"].items()),
        f"- Labels: {', '.join(info.get('labels') or []) or 'none'}",
    ]
    if heads:
        lines += ["", "| head | kind | outputs | thresholds | rule |", "|---|---|---|---|---|"]
        for h in heads:
            th = h.get("thresholds")
            th_text = ", ".join(f"{t:.3f}" for t in th) if th else "-"
            lines.append(f"| {h['name']} | {h['kind']} | {h['size']} | {th_text} | "
                         f"{h.get('threshold_rule') or '-'} |")
    lines += [
        "", "## Training settings", "",
        f"- Adaptation: {adapt.get('method')} ({training.get('adapt', {}).get('trainable')} "
        f"of {training.get('adapt', {}).get('total')} parameters trained)",
        f"- Steps: {training.get('steps')} (planned {training.get('planned_steps')}), "
        f"epochs {optim.get('epochs')}, batch {optim.get('batch_size')} x accumulation "
        f"{optim.get('grad_accum')}, lr {optim.get('lr')}, weight decay "
        f"{optim.get('weight_decay')}, warm-up {optim.get('warmup_ratio')}",
        f"- Precision {training.get('precision')} on {training.get('device')}, seed "
        f"{cfg.get('seed')}, {training.get('seconds')} s"
        + (", stopped early" if training.get("stopped_early") else ""),
        f"- Image size {info.get('image_size')}, preprocessing `{info.get('preprocess')}`",
        "", "## Results (validation split)", "",
        f"Checkpoint selected by `{best.get('metric')}` ({best.get('mode')}) at step "
        f"{_fmt(best.get('step'))}.", "",
        *_metrics_table(info.get("metrics", {})),
        "", "## Intended use and limitations", "",
        "Research and engineering use: retrieval, triage prototypes and evaluation of "
        "adaptation methods on medical images. This model is **not** a medical device and "
        "makes **no diagnostic claim**; its outputs must not drive clinical decisions. "
        "Validation numbers come from the split above only; performance on other sites, "
        "devices, populations or skin types is unknown until measured. Thresholds were "
        "chosen on the validation split and should be re-checked on held-out test data.",
        "", "Full configuration: `config.yaml`; per-step log: `log.csv`; TensorBoard: "
        "`tensorboard/`.", "",
    ]
    return "\n".join(lines)


def write_card(out_dir: str | Path, info: dict[str, Any]) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(render_card(info))
    return path
