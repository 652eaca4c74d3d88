"""`medsig demo`: the main job end to end on generated data, a tiny model and a local Qdrant.

generate data -> write a tiny model -> inspect -> split by case -> embed + index -> search
-> fine-tune (contrastive multi-positive, classification heads, a probe) -> compare them with
the base model in one evaluation report -> print how to serve the classifier.
Everything it did is written to the output folder (`summary.json`, `README.md`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

DEMO_N = 1200  # images: enough for a tiny model trained from scratch to learn in minutes


class _Steps:
    """Times each step and keeps what it produced."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.log: list[dict[str, Any]] = []

    def run(self, name: str, fn, *args, **kwargs):
        self.console.rule(f"[bold]{name}")
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.log.append({"step": name, "seconds": round(seconds, 2),
                         "cpu_seconds": round(time.process_time() - cpu, 2)})
        self.console.print(f"[dim]{name}: {seconds:.1f} s[/]")
        return result


def run_demo(out: str | Path = "runs/demo", n: int = DEMO_N, seed: int = 0,
             console: Console | None = None) -> dict[str, Any]:
    """The main job end to end in ``out``: data, split, index + search, three fine-tunes,
    one evaluation report; ``summary.json`` and ``README.md`` say what happened."""
    from medsig.index.store import close_store

    console = console or Console()
    out = Path(out)
    if out.exists():
        close_store(out / "qdrant")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = _Steps(console)
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    spec_path, model_dir, report, result = _prepare(steps, out, n, seed, console)
    store = out / "qdrant"
    collection, embed, again, searches = _index_and_search(steps, spec_path, model_dir, store,
                                                           console)
    models = _train_models(steps, spec_path, model_dir, out / "models", seed, console)
    evaluation = _evaluate(steps, spec_path, {"base": str(model_dir), **models},
                           out / "report", seed, console)
    summary = {
        "data": str(spec_path), "model": str(model_dir), "store": str(store),
        "rows": len(collection), "split": result.counts(), "inspect": report.to_dict(),
        "embed": embed.to_dict(), "embed_again": again.to_dict(), "searches": searches,
        "models": models, "evaluation": evaluation,
        "steps": steps.log, "total_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "cores": os.cpu_count(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_readme(out, summary)
    console.rule("[bold green]done")
    console.print(f"demo finished in {summary['total_seconds']} s; see {out / 'README.md'}")
    console.print(f"try: medsig search --store {store} --collection derm "
                  f"--text \"A dermatological image showing eczema.\"")
    console.print(f"serve the fine-tuned classifier (API + web page at http://127.0.0.1:8000/):"
                  f"\n  medsig serve --model {models['classify']} --store {store} "
                  f"--collection derm")
    return summary


def _prepare(steps: _Steps, out: Path, n: int, seed: int, console: Console
             ) -> tuple[Path, Path, Any, Any]:
    """Generated data, the tiny random model, inspection and the split by case."""
    from medsig.data.collection import load_collection
    from medsig.data.inspect import inspect_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    spec_path = steps.run("generate dermatology data", synthesize, "derm", out / "data", n=n,
                          seed=seed)
    model_dir = steps.run("write tiny SigLIP model", write_tiny, out / "models" / "base",
                          arch="siglip", seed=seed)
    collection = load_collection(spec_path)
    report = steps.run("inspect", inspect_collection, collection)
    console.print(f"{report.rows} rows, {report.groups} cases, "
                  f"{len(report.labels)} labels; {len(report.warnings)} warning(s)")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    result = steps.run("split by case (stratified)", split_collection, collection, seed=seed)
    splits_path, _ = write_split(collection, result, spec_path.parent)
    set_spec_splits(spec_path, splits_path.name)
    console.print(", ".join(f"{k} {v}" for k, v in result.counts().items()))
    return spec_path, model_dir, report, result


def _index_and_search(steps: _Steps, spec_path: Path, model_dir: Path, store: Path,
                      console: Console) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Embed + index (twice: the second run resumes), then search by image, text and id."""
    from medsig.data.collection import load_collection
    from medsig.index.runner import embed_collection
    from medsig.index.store import close_store
    from medsig.models.encoder import Encoder

    collection = load_collection(spec_path)
    encoder = Encoder.load(model_dir)
    embed = steps.run("embed + index into Qdrant", embed_collection, collection, encoder,
                      store, "derm", progress=False)
    console.print(f"{embed.embedded} images embedded at {embed.images_per_second:.0f} images/s "
                  f"-> {embed.points_after} points")
    again = steps.run("re-run embed (resumes, adds nothing)", embed_collection, collection,
                      encoder, store, "derm", progress=False)
    console.print(f"second run: {again.embedded} embedded, {again.already_indexed} already "
                  f"indexed, {again.points_after} points")
    searches = _searches(steps, collection, encoder, store, console)
    close_store(store)
    return collection, embed, again, searches


def _searches(steps: _Steps, collection: Any, encoder: Any, store: Path, console: Console
              ) -> dict[str, Any]:
    from medsig.index.search import search

    query_row = next(i for i in range(len(collection)) if collection.split[i] == "test")
    condition = collection.labels["condition"].readable(query_row)
    queries = {
        "by image": dict(image=collection.image_paths[query_row]),
        "by text": dict(text=f"A dermatological image showing {condition.split(', ')[0]}."),
        "by id, train split only": dict(id=collection.ids[query_row], where=["split=train"]),
    }
    searches = {}
    for name, query in queries.items():
        hits = steps.run(f"search {name}", search, store, "derm", encoder=encoder, k=5, **query)
        searches[name] = {"query": {k: str(v) for k, v in query.items()},
                          "hits": [{"id": h.id, "score": round(h.score, 4),
                                    "case": h.payload.get("id"),
                                    "condition": h.payload["labels"].get("condition"),
                                    "split": h.payload.get("split")} for h in hits]}
        for h in hits:
            console.print(f"  {h.score:.3f}  {h.payload.get('id')}  "
                          f"{h.payload['labels'].get('condition')}  ({h.payload.get('split')})")
    return searches


def _train_models(steps: _Steps, spec: Path, base: Path, out: Path, seed: int,
                  console: Console) -> dict[str, str]:
    """Fine-tunes of the tiny model on the train split (val picks the best epoch), with the
    defaults of a random starting point (lr 1e-3, 20 epochs; see docs/training.md)."""
    from medsig.train import train
    from medsig.train.probe import train_probe

    common = {"spec": str(spec), "seed": seed, "data": {"augment": False}}
    contrastive = steps.run(
        "fine-tune: contrastive, multi-positive sigmoid", train,
        {**common, "model": str(base), "out": str(out / "contrastive"),
         "objective": "contrastive",
         "contrastive": {"loss": "multi_positive_sigmoid", "positives": "any_shared",
                         "main_label": "category"}, "eval": {"best_metric": "val/nmi"}})
    classify = steps.run(
        "fine-tune: classification heads (masked BCE)", train,
        {**common, "model": str(base), "out": str(out / "classify"), "objective": "classify",
         "optim": {"epochs": 25}, "eval": {"thresholds": {"urgent": 0.9}}})
    probe = steps.run("probe: logistic regression on the contrastive model's embeddings",
                      train_probe, {**common, "model": str(contrastive),
                                    "out": str(out / "probe"), "objective": "probe",
                                    "probe": {"C": [0.1, 1.0]}})
    models = {"contrastive": str(contrastive), "classify": str(classify), "probe": str(probe)}
    for name, folder in models.items():
        info = json.loads((Path(folder) / "medsig.json").read_text())
        metrics = info.get("metrics", {})
        start, best = metrics.get("start") or {}, metrics.get("val") or {}
        key = "val/nmi" if name == "contrastive" else "val/macro_auc"
        before = f"{start[key]:.3f} -> " if key in start else ""
        value = best.get(key)
        console.print(f"{name}: {key} {before}{value:.3f}" if value is not None else name)
    return models


def _evaluate(steps: _Steps, spec: Path, models: dict[str, str], out: Path, seed: int,
              console: Console) -> dict[str, Any]:
    """Base vs fine-tuned on the test split: one report with CIs (report.html)."""
    from medsig.evaluate.run import evaluate

    metrics = steps.run("evaluate on test: base vs fine-tuned", evaluate, spec, models,
                        split="test", out=out, n_boot=200, subgroups=["fitzpatrick"],
                        seed=seed)
    console.print(f"report: {out / 'report.html'} (and report.md, metrics.json)")
    learning = learning_summary(metrics)
    for line in learning["lines"]:
        console.print(f"  {line}")
    return {"report": str(out / "report.html"), "metrics": str(out / "metrics.json"),
            "models": list(metrics.get("models", models)), "learning": learning}


def _ci(metrics: dict[str, Any], metric: str, model: str) -> str:
    r = (metrics.get("headline") or {}).get(metric, {}).get(model)
    return f"{r['point']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" if r else "n/a"


def learning_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Did fine-tuning help? The test-split numbers the demo's README states (95% CIs)."""
    paired = metrics.get("paired") or {}

    def verdict(metric: str, model: str) -> str:
        return (paired.get(metric) or {}).get(model, {}).get("verdict", "n/a")

    lines = [
        f"classify: macro AUC {_ci(metrics, 'classification/macro_auc', 'classify')} "
        f"(base model zero-shot: {_ci(metrics, 'zeroshot/macro_auc', 'base')})",
        f"probe on the contrastive embeddings: macro AUC "
        f"{_ci(metrics, 'classification/macro_auc', 'probe')} (chance 0.5)",
    ]
    for metric in ("retrieval/image_to_text_recall@5", "retrieval/text_to_image_recall@5",
                   "zeroshot/accuracy"):
        lines.append(f"contrastive vs base, {metric}: {_ci(metrics, metric, 'contrastive')} "
                     f"vs {_ci(metrics, metric, 'base')}; {verdict(metric, 'contrastive')}")
    return {"lines": lines}


def _write_readme(out: Path, summary: dict[str, Any]) -> None:
    lines = ["# medsig demo run", "",
             "Generated dermatology data (labels drawn visibly into the images: a colour per "
             "category, shapes per condition, a dark rim when urgent), a tiny randomly "
             "initialised SigLIP trained from scratch on the train split, a local Qdrant.",
             "The base model is random: its neighbours and zero-shot answers are chance; "
             "the fine-tuned models are compared with it below.", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {s['step']} | {s['seconds']} |" for s in summary["steps"]]
    lines[lines.index("| step | seconds |")] = "| step | seconds (wall) |"
    e = summary["embed"]
    lines += ["", f"- rows: {summary['rows']}; split: {summary['split']}",
              f"- embedded {e['embedded']} images at {e['images_per_second']} images/s; "
              f"points: {e['points_after']}; second run added "
              f"{summary['embed_again']['embedded']}",
              f"- total: {summary['total_seconds']} s", "",
              "## Fine-tuned models", ""]
    for name, folder in summary.get("models", {}).items():
        lines.append(f"- {name}: `{folder}` (model card: `{folder}/README.md`)")
    learning = summary.get("evaluation", {}).get("learning")
    if learning:
        lines += ["", "## What fine-tuning did (test split, 95% group-bootstrap CIs)", ""]
        lines += [f"- {line}" for line in learning["lines"]]
    load = summary.get("load_average")
    if load:
        lines += ["", f"Timing: {summary['total_seconds']} s wall, {summary['cpu_seconds']} s "
                      f"of process CPU time; load average {load[0]} at the start and "
                      f"{load[1]} at the end (1-minute, this machine's cores: "
                      f"{summary['cores']}). On a shared machine the wall time is longer "
                      f"than on an idle one."]
    report = summary.get("evaluation", {}).get("report")
    if report:
        lines += ["", "## Evaluation", "",
                  f"Base vs fine-tuned on the test split, with group-bootstrap 95% confidence "
                  f"intervals and paired differences: `{report}` (also `report.md`, "
                  f"`metrics.json`). A tiny model trained for minutes on generated data: the "
                  f"numbers show the pipeline, not a clinical result.", ""]
    (out / "README.md").write_text("\n".join(lines))
