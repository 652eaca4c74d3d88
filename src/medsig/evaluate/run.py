"""Evaluate one or more models on one split: classification, retrieval, zero-shot, clustering.

Every headline metric gets a 95% group-bootstrap CI (cases / patients resampled, not rows);
each model is compared with the first by a paired bootstrap on the same resamples. Model
outputs (embeddings, head and zero-shot probabilities) are cached in ``out/cache/<model>.npz``
keyed by a fingerprint of (model files, spec + table, split rows), so re-runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsig.data.collection import Collection, load_collection
from medsig.data.duplicates import DEFAULT_THRESHOLD, cross_split_duplicates
from medsig.errors import ConfigError, DataError
from medsig.evaluate.bootstrap import bootstrap_ci, paired_bootstrap
from medsig.evaluate.leakage import leakage_report
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
from medsig.metrics.classification import nanmean

TASKS = ("classification", "retrieval", "zeroshot", "clustering")
CACHE_VERSION = 2
TSNE_POINTS = 2000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# -- model outputs and cache -------------------------------------------------------------------
def _meta(path: str) -> dict[str, Any]:
    file = Path(path) / "medsig.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"unreadable medsig.json: {exc}", file=file) from None


def _signature(path: str) -> list[Any]:
    p = Path(path)
    if not p.exists():
        return [path]  # a hub id
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def fingerprint(path: str, col: Collection, device: str | None = None) -> str:
    """sha256 of the model files (and base encoder), the spec + table bytes, the split rows."""
    h = hashlib.sha256()
    for file in (col.spec.path, col.spec.table_path):
        if file is not None and Path(file).is_file():
            h.update(Path(file).read_bytes())
    base = _meta(path).get("encoder")
    parts = {"v": CACHE_VERSION, "model": _signature(path), "ids": col.ids,
             "encoder": _signature(str(base)) if base else None, "device": device}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _predict(predictor: Any, col: Collection, rows: np.ndarray, batch_size: int,
             num_workers: int | None) -> np.ndarray:
    from medsig.data.reader import read_batches

    k = sum(int(h["size"]) for h in predictor.heads)
    out = np.full((len(col), k), np.nan, np.float32)
    for b in read_batches(col.image_paths, rows.tolist(), predictor.preprocess, batch_size,
                          num_workers, draft_size=predictor.image_size):
        if b.rows:
            out[b.rows] = predictor.predict_pixels(b.pixels)
    return out[rows]


def compute_outputs(path: str, col: Collection, batch_size: int = 64, device: str | None = None,
                    num_workers: int | None = None) -> ModelOutputs:
    """Embed the split with one model; head probabilities and zero-shot where available."""
    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder

    start = time.perf_counter()
    meta = _meta(path)
    predictor = None
    if meta.get("objective") in ("classify", "probe") and meta.get("heads"):
        from medsig.models.predictor import load_predictor

        predictor = load_predictor(path, device=device)
        encoder = predictor.encoder
    else:
        encoder = Encoder.load(path, device=device, preprocess=meta.get("preprocess"))
    has_text = encoder.tokenizer is not None
    image, text, rows, skipped = embed_arrays(encoder, col, batch_size, num_workers,
                                              texts=has_text)
    res = ModelOutputs(rows, image.astype(np.float32),
                       None if text is None else text.astype(np.float32))
    if predictor is not None and predictor.uses_embeddings:  # a probe: no second image pass
        res.probs = predictor.predict_embeddings(res.image)
    elif predictor is not None:
        res.probs = _predict(predictor, col, rows, batch_size, num_workers)
    if has_text:
        res.zeroshot, class_text = zeroshot_all(encoder, col.subset(rows), res.image)
        main = main_label(col)
        res.class_text = class_text[main] if main is not None else None
    res.info = {"kind": encoder.kind, "objective": meta.get("objective"),
                "heads": list(predictor.heads) if predictor is not None else [],
                "embed_dim": int(image.shape[1]), "skipped_images": dict(skipped),
                "embed_seconds": round(time.perf_counter() - start, 3)}
    return res


def zeroshot_all(encoder: Any, col: Collection, image: np.ndarray
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per label: zero-shot probabilities (n, C) and class text embeddings (C, d).

    The same prompts, prompt ensembling and activation as ``zeroshot_probabilities``, with
    every prompt of every label embedded in one batch.
    """
    from medsig.models.zeroshot import class_probabilities, class_prompts, scale_bias

    prompts = class_prompts(col, list(col.labels))
    flat = [t for per in prompts.values() for texts in per.values() for t in texts]
    emb = encoder.embed_texts(flat).numpy().astype(np.float64)
    scale, bias = scale_bias(encoder)
    probs, classes, at = {}, {}, 0
    for label, per in prompts.items():
        rows = []
        for texts in per.values():
            mean = emb[at:at + len(texts)].mean(axis=0)
            rows.append(mean / np.linalg.norm(mean))
            at += len(texts)
        classes[label] = np.stack(rows).astype(np.float32)
        probs[label] = class_probabilities(image, classes[label], col.labels[label].kind,
                                           scale, bias, sigmoid=encoder.kind == "siglip")
    return probs, classes


def _save_cache(file: Path, fp: str, res: ModelOutputs) -> None:
    arrays = {"rows": res.rows, "image": res.image}
    for key in ("text", "probs", "class_text"):
        if getattr(res, key) is not None:
            arrays[key] = getattr(res, key)
    labels = list(res.zeroshot)
    arrays.update({f"zs_{i}": res.zeroshot[k] for i, k in enumerate(labels)})
    info = {**res.info, "zeroshot_labels": labels}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, fingerprint=np.array(fp), info=np.array(json.dumps(info)), **arrays)
    tmp.replace(file)


def _load_cache(file: Path, fp: str) -> ModelOutputs | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fp:
                return None
            info = json.loads(str(z["info"]))
            labels = info.pop("zeroshot_labels", [])
            get = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or old cache: recompute
    return ModelOutputs(get["rows"], get["image"], get.get("text"), get.get("probs"),
                        {k: get[f"zs_{i}"] for i, k in enumerate(labels)},
                        get.get("class_text"), info)


def model_outputs(name: str, path: str, col: Collection, cache_dir: Path | None,
                  batch_size: int = 64, device: str | None = None,
                  num_workers: int | None = None) -> ModelOutputs:
    """Cached outputs when the fingerprint matches, else compute (and cache) them."""
    fp = fingerprint(path, col, device)
    file = cache_dir / f"{name}.npz" if cache_dir is not None else None
    res = _load_cache(file, fp) if file is not None else None
    if res is not None:
        res.info["cache"] = "hit"
        return res
    res = compute_outputs(path, col, batch_size, device, num_workers)
    if file is not None:
        _save_cache(file, fp, res)
    res.info["cache"] = "miss"
    return res


# -- validity ----------------------------------------------------------------------------------
def _ci(fn: Callable[..., float], arrays: tuple, groups: np.ndarray, n_boot: int, seed: int,
        bias_correct: bool = False) -> dict[str, Any]:
    """Percentile group-bootstrap CI; with ``bias_correct`` the interval is shifted by the
    bootstrap bias (mean of the resamples - point estimate)."""
    values: list[float] = []

    def recording(*a: np.ndarray) -> float:
        values.append(float(fn(*a)))
        return values[-1]

    try:
        res = bootstrap_ci(recording, *arrays, groups=groups, n_boot=n_boot, seed=seed).as_dict()
    except (DataError, ValueError) as exc:
        nan = float("nan")
        return {"point": nan, "low": nan, "high": nan, "error": str(exc)}
    if bias_correct:
        bias = nanmean(values[1:]) - res["point"]
        if math.isfinite(bias):
            res.update(bias=bias, low_uncorrected=res["low"], high_uncorrected=res["high"],
                       low=res["low"] - bias, high=res["high"] - bias)
    return res


def validity(hl: Headlines, order: Sequence[str], groups: np.ndarray, n_boot: int,
             seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Group-bootstrap CIs, paired differences vs the first model, and a winner per metric."""
    headline: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    winners: dict[str, Any] = {}
    first = order[0]
    for metric, per in hl.items.items():
        headline[metric] = {m: _ci(fn, arrays, groups, n_boot, seed, corr)
                            for m, (fn, arrays, _, corr) in per.items()}
        paired[metric] = {}
        for m, (fn, arrays, key, _) in per.items():
            if m == first or first not in per:
                continue
            if per[first][2] != key:
                paired[metric][m] = {"verdict": "not comparable (different labels)"}
                continue
            paired[metric][m] = paired_bootstrap(fn, arrays, per[first][1], groups, n_boot,
                                                 seed=seed, names=(m, first))
        points = {m: r["point"] for m, r in headline[metric].items()
                  if isinstance(r["point"], float) and math.isfinite(r["point"])}
        if not points:
            continue
        best = max(points, key=lambda m: points[m])
        if len(points) == 1:
            verdict = "only model"
        elif first not in points:
            verdict = f"untested ({first} lacks this metric)"
        elif best == first:
            others = [p for p in paired[metric].values() if "significant" in p]
            verdict = "clear" if others and all(p["significant"] for p in others) \
                else "not significant"
        else:
            verdict = "clear" if paired[metric].get(best, {}).get("significant") \
                else "not significant"
        winners[metric] = {"model": best, "value": points[best], "verdict": verdict}
    return headline, paired, winners


def subgroup_tables(col: Collection, columns: Sequence[str], hl: Headlines
                    ) -> dict[str, Any]:
    """Row / group counts and every headline point estimate within each value of a column."""
    out: dict[str, Any] = {}
    missing = set(col.spec.missing_values)
    for column in columns:
        raw = [str(v).strip() for v in col.frame[column].tolist()]
        values = np.array(["MISSING" if v in missing or v.lower() == "nan" else v
                           for v in raw], dtype=object)
        table: dict[str, Any] = {"counts": {}, "groups": {}, "metrics": {}}
        for v in sorted(set(values.tolist())):
            idx = np.nonzero(values == v)[0]
            table["counts"][v] = int(len(idx))
            table["groups"][v] = len(set(col.groups[idx].tolist()))
            for metric, per in hl.items.items():
                row = table["metrics"].setdefault(metric, {}).setdefault(v, {})
                for m, (fn, arrays, _, _) in per.items():
                    try:
                        row[m] = float(fn(*[a[idx] for a in arrays]))
                    except (ValueError, ZeroDivisionError, DataError):
                        row[m] = float("nan")
        out[column] = table
    return out


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
    from medsig.evaluate.report import tsne_map

    main = main_label(col)
    colour = next((k for k, v in col.labels.items() if v.parent == main), main) \
        if main is not None else next(iter(col.labels), None)
    idx = np.arange(len(col))
    if len(idx) > TSNE_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), TSNE_POINTS, replace=False))
    if colour is not None:
        cls = primary_class(col, colour)[idx]
        names = col.labels[colour].classes
        values = [names[c] if c >= 0 else "MISSING" for c in cls.tolist()]
    else:
        values = ["all"] * len(idx)
    res: dict[str, Any] = {"label": colour, "values": values, "models": {}}
    for name, out in outputs.items():
        if len(idx) >= 5:
            xy = tsne_map(out.image[idx], seed)
            res["models"][name] = {"x": xy[:, 0].round(3).tolist(),
                                   "y": xy[:, 1].round(3).tolist()}
    return res


def clean(x: Any) -> Any:
    """JSON-safe copy: numpy to Python, NaN / inf to None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


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
             purpose: str = "eval") -> dict[str, Any]:
    """Evaluate ``models`` ({name: path or hub id}) on ``split``; the JSON-safe metrics dict.

    With ``out``: writes out/metrics.json, the report (report.md / report.html) and caches
    model outputs in out/cache/<name>.npz. ``duplicates``: the cosine threshold of the
    near-duplicate check across splits (``medsig.data.duplicates``; None: skipped).
    ``retention``: also measure the spec's retention check (on ``retention_split``, default
    the spec's or ``split``). ``audit``: the hidden-subgroup audit (``evaluate/audit.py``).
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
    roc: dict[str, Any] = {"classification": {}, "zeroshot": {}}
    curves: dict[str, Any] = {"roc": roc, "recall_at_k": {}}
    results: dict[str, Any] = {t: {} for t in tasks}
    for m, o in outputs.items():
        if "classification" in tasks:
            results["classification"][m] = classification(col, o, hl, m, roc["classification"])
        if "zeroshot" in tasks:
            results["zeroshot"][m] = zeroshot(col, o, hl, m, roc["zeroshot"])
        if "retrieval" in tasks:
            results["retrieval"][m] = retrieval(col, o, hl, m, curves["recall_at_k"],
                                                batchwise_size, seed)
        if "clustering" in tasks:
            results["clustering"][m] = clustering(col, o, hl, m, seed)
    headline, paired, winners = validity(hl, list(models), col.groups, n_boot, seed)
    curves["tsne"] = _tsne(col, outputs, seed)
    metrics = clean({
        "spec": {"name": full.spec.name, "path": str(full.spec.path)},
        "split": split, "n_rows": len(col), "n_groups": len(set(col.groups.tolist())),
        "n_rows_in_split": len(idx), "tasks": tasks, "n_boot": n_boot, "alpha": 0.05,
        "seed": seed, "batchwise_size": batchwise_size, "model_order": list(models),
        "models": {m: {"path": str(models[m]), **{k: v for k, v in o.info.items()
                                                  if k != "heads"}}
                   for m, o in outputs.items()},
        "leakage": leakage, **results, "headline": headline, "paired": paired,
        "winners": winners, "subgroups": subgroup_tables(col, list(subgroups or []), hl),
        "curves": curves, "seconds": round(time.perf_counter() - started, 2),
    })
    # -- i17 hooks: retention check (the spec's), hidden-subgroup audit, test-set ledger --
    if retention:
        from medsig.evaluate.retention import retention_check

        spec_r = full.spec
        if retention_split is not None and spec_r.retention:
            spec_r.retention = {**spec_r.retention, "split": retention_split}
        metrics["retention"] = clean(retention_check(
            spec_r, {m: str(p) for m, p in models.items()}, split, out_dir,
            batch_size=batch_size, n_boot=n_boot, seed=seed, device=device,
            num_workers=num_workers, duplicates=None))
    if split == "test":
        from medsig.evaluate.ledger import record_use

        metrics["ledger"] = record_use(full.spec, [full.ids[i] for i in idx],
                                       full.groups[idx].tolist(), dict(models), purpose)
    if audit:
        from medsig.evaluate.audit import audit as audit_subgroups

        metrics["audit"] = clean(audit_subgroups(col, hl, outputs, None, None,
                                                 min(n_boot, 100), seed))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if report:
            from medsig.evaluate.report import write_report

            write_report(metrics, out_dir)
    return metrics
