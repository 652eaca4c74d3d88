"""Evaluate one or more models on one split: classification, retrieval, zero-shot, clustering.

The orchestrator: model outputs come from ``evaluate.outputs`` (cached), the four tasks from
``evaluate.tasks``, CIs and paired tests from ``evaluate.statistics``. Every headline metric
gets a 95% group-bootstrap CI (cases / patients resampled, not rows); each model is compared
with the first by a paired bootstrap on the same resamples.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsig.data.collection import Collection, load_collection
from medsig.data.duplicates import DEFAULT_THRESHOLD, cross_split_duplicates
from medsig.errors import ConfigError, DataError
from medsig.evaluate import TASKS  # re-exported: medsig.evaluate.run.TASKS
from medsig.evaluate.clinical import clinical_tables
from medsig.evaluate.leakage import leakage_report
from medsig.evaluate.outputs import (  # noqa: F401 (the public names of evaluate.run)
    compute_outputs,
    fingerprint,
    model_outputs,
    zeroshot_all,
)
from medsig.evaluate.safety import safe_outputs
from medsig.evaluate.statistics import NOT_RECORDED, subgroup_tables, validity
from medsig.evaluate.tasks import (
    Headlines,
    ModelOutputs,
    classification,
    clustering,
    main_label,
    primary_class,
    retrieval,
    zeroshot,
)
from medsig.models.artifact import clean_json

TSNE_POINTS = 2000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# -- checks and maps ----------------------------------------------------------------------------
def check_leakage(full: Collection) -> dict[str, Any]:
    """leakage_report of the whole collection; ConfigError naming groups found in two splits."""
    if full.split is None:
        raise ConfigError("the collection has no split; run `medsig data split` first",
                          file=full.spec.path)
    rep = leakage_report(full.groups, full.split)
    if rep["n_leaked_groups"]:
        shown = ", ".join(f"'{g}' ({'/'.join(s)})" for g, s in rep["leaked_groups"].items())
        raise ConfigError(f"split leakage: {rep['n_leaked_groups']} group(s) appear in more "
                          f"than one split: {shown}", file=full.spec.path)
    return rep


def _tsne(col: Collection, outputs: dict[str, ModelOutputs], seed: int) -> dict[str, Any]:
    from medsig.evaluate.figures import tsne_map

    main = main_label(col)
    colour = next((k for k, v in col.labels.items() if v.parent == main), main) \
        if main is not None else next(iter(col.labels), None)
    idx = np.arange(len(col))
    if len(idx) > TSNE_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), TSNE_POINTS, replace=False))
    if colour is not None:
        cls = primary_class(col, colour)[idx]
        names = col.labels[colour].classes
        values = [names[c] if c >= 0 else NOT_RECORDED for c in cls.tolist()]
    else:
        values = ["all"] * len(idx)
    res: dict[str, Any] = {"label": colour, "values": values, "models": {}}
    for name, out in outputs.items():
        if len(idx) >= 5:
            xy = tsne_map(out.image[idx], seed)
            res["models"][name] = {"x": xy[:, 0].round(3).tolist(),
                                   "y": xy[:, 1].round(3).tolist()}
    return res


# -- entry point -------------------------------------------------------------------------------
def _check(models: dict[str, str], tasks: Sequence[str], col: Collection,
           subgroups: Sequence[str]) -> None:
    if not models:
        raise ConfigError("no models to evaluate: pass at least one name=path")
    for name in models:
        if not _NAME.match(name):
            raise ConfigError(f"model name '{name}': use letters, digits, '.', '_' or '-'")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none)'}: choose from "
                          f"{', '.join(TASKS)}")
    for c in subgroups:
        if c not in col.frame.columns:
            known = ", ".join(map(str, col.frame.columns))
            raise ConfigError(f"unknown subgroup column '{c}' (columns: {known})",
                              file=col.spec.table_path)


def evaluate(spec: str | Path, models: dict[str, str], tasks: Sequence[str] = TASKS,
             split: str = "test", out: str | Path | None = None, batch_size: int = 64,
             n_boot: int = 1000, subgroups: Sequence[str] | None = None,
             batchwise_size: int = 32, seed: int = 0, device: str | None = None,
             num_workers: int | None = None, report: bool = True,
             duplicates: float | None = DEFAULT_THRESHOLD, retention: bool = True,
             retention_split: str | None = None, audit: bool = True,
             purpose: str = "eval", replicates: bool = False) -> dict[str, Any]:
    """Evaluate ``models`` ({name: path or hub id}) on ``split``; the JSON-safe metrics dict.

    With ``out``: writes out/metrics.json, the report (report.md / report.html) and caches
    model outputs in out/cache/<name>.npz. ``duplicates``: the cosine threshold of the
    near-duplicate check across splits (``medsig.data.duplicates``; None: skipped).
    ``retention``: also measure the spec's retention check (on ``retention_split``, default
    the spec's or ``split``). ``audit``: the hidden-subgroup audit (``evaluate/audit.py``).
    ``replicates``: every headline CI also holds its bootstrap resample values (the same
    resamples for every model: statistics across models, e.g. ``alpha_table``'s ratios).
    Reading the test split counts one use (``purpose``) in the collection's test-set ledger
    (``evaluate/ledger.py``).
    """
    started = time.perf_counter()
    tasks = list(tasks)
    full = load_collection(spec)
    leakage = check_leakage(full)
    idx = np.nonzero(np.asarray(full.split) == split)[0]
    if len(idx) == 0:
        raise ConfigError(f"split '{split}' has no rows", file=full.spec.path)
    col = full.subset(idx)
    _check(models, tasks, col, list(subgroups or []))
    out_dir = Path(out) if out is not None else None
    cache = out_dir / "cache" if out_dir is not None else None
    if duplicates is not None:
        leakage["near_duplicates"] = cross_split_duplicates(
            full.image_paths, full.groups, full.split, full.ids, duplicates,
            cache / "signatures.npz" if cache is not None else None, num_workers)
    outputs = {m: model_outputs(m, str(p), col, cache, batch_size, device, num_workers)
               for m, p in models.items()}
    common = sorted(set.intersection(*(set(o.rows.tolist()) for o in outputs.values())))
    if not common:
        raise DataError(f"no image of split '{split}' could be read", file=full.spec.path)
    for m, o in outputs.items():
        pos = {int(r): i for i, r in enumerate(o.rows.tolist())}
        outputs[m] = o.take(np.array([pos[r] for r in common], dtype=np.int64))
    col = col.subset(np.asarray(common))
    hl = Headlines()
    results, safe, clinical, curves = _run_tasks(col, outputs, models, tasks, hl, n_boot,
                                                 batchwise_size, seed)
    headline, paired, winners = validity(hl, list(models), col.groups, n_boot, seed,
                                         replicates)
    curves["tsne"] = _tsne(col, outputs, seed)
    metrics = clean_json({
        "spec": {"name": full.spec.name, "path": str(full.spec.path)},
        "split": split, "n_rows": len(col), "n_groups": len(set(col.groups.tolist())),
        "n_rows_in_split": len(idx), "tasks": tasks, "n_boot": n_boot, "alpha": 0.05,
        "seed": seed, "batchwise_size": batchwise_size, "model_order": list(models),
        "models": {m: {"path": str(models[m]), **{k: v for k, v in o.info.items()
                                                  if k != "heads"}}
                   for m, o in outputs.items()},
        "leakage": leakage, **results, "headline": headline, "paired": paired,
        "winners": winners, "safe_outputs": safe, "clinical": clinical,
        "subgroups": subgroup_tables(col, list(subgroups or []), hl),
        "curves": curves, "seconds": round(time.perf_counter() - started, 2),
    })
    fidelity = {"retention": retention, "retention_split": retention_split, "audit": audit,
                "purpose": purpose, "batch_size": batch_size, "num_workers": num_workers,
                "replicates": replicates}
    metrics.update(_fidelity(full, idx, col, hl, outputs, models, split, out_dir, fidelity,
                             n_boot, seed, device))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if report:
            from medsig.evaluate.report import write_report

            write_report(metrics, out_dir)
    return metrics


def _fidelity(full: Collection, idx: np.ndarray, col: Collection, hl: Headlines,
              outputs: dict[str, ModelOutputs], models: dict[str, str], split: str,
              out_dir: Path | None, opts: dict[str, Any], n_boot: int, seed: int,
              device: str | None) -> dict[str, Any]:
    """The spec's retention check, the test-set ledger and the hidden-subgroup audit."""
    found: dict[str, Any] = {}
    if opts["retention"]:
        from medsig.evaluate.retention import retention_check

        spec_r = full.spec
        if opts["retention_split"] is not None and spec_r.retention:
            spec_r.retention = {**spec_r.retention, "split": opts["retention_split"]}
        found["retention"] = clean_json(retention_check(
            spec_r, {m: str(p) for m, p in models.items()}, split, out_dir, evaluate,
            batch_size=opts["batch_size"], n_boot=n_boot, seed=seed, device=device,
            num_workers=opts["num_workers"], duplicates=None,
            replicates=opts["replicates"]))
    if split == "test":
        from medsig.evaluate.ledger import record_use

        found["ledger"] = record_use(full.spec, [full.ids[i] for i in idx],
                                     full.groups[idx].tolist(), dict(models), opts["purpose"])
    if opts["audit"]:
        from medsig.evaluate.audit import audit as audit_subgroups

        found["audit"] = clean_json(audit_subgroups(col, hl, outputs, None, None,
                                                    min(n_boot, 100), seed))
    return found


def _run_tasks(col: Collection, outputs: dict[str, ModelOutputs], models: dict[str, str],
               tasks: Sequence[str], hl: Headlines, n_boot: int, batchwise_size: int,
               seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                                   dict[str, Any]]:
    """Every task for every model: (results per task, safe outputs, clinical tables,
    curves); headline statistics are recorded in ``hl``."""
    roc: dict[str, Any] = {"classification": {}, "zeroshot": {}}
    curves: dict[str, Any] = {"roc": roc, "recall_at_k": {}}
    results: dict[str, Any] = {t: {} for t in tasks}
    safe: dict[str, Any] = {}
    clinical: dict[str, Any] = {}
    for m, o in outputs.items():
        if "classification" in tasks:
            results["classification"][m] = classification(col, o, hl, m, roc["classification"])
            safe[m] = safe_outputs(col, o, models[m])  # calibration, conformal, OOD
            clinical[m] = clinical_tables(col, o, n_boot, seed)  # evaluate/clinical.py
        if "zeroshot" in tasks:
            results["zeroshot"][m] = zeroshot(col, o, hl, m, roc["zeroshot"])
        if "retrieval" in tasks:
            results["retrieval"][m] = retrieval(col, o, hl, m, curves["recall_at_k"],
                                                batchwise_size, seed)
        if "clustering" in tasks:
            results["clustering"][m] = clustering(col, o, hl, m, seed)
    return results, safe, clinical, curves
