"""Hidden subgroups: where does a model fail that the average hides?

Two kinds of subgroups of the evaluated split, per model:

- **clusters** of the model's image embeddings (k-means on L2-normalised embeddings): groups
  nobody labelled (a lighting, a skin tone, a camera, a wound site);
- every **metadata column** with few distinct values (each value a subgroup).

For each subgroup: n (images, groups), the headline metric, and its gap to the rest of the
split (metric(subgroup) − metric(rest)); clusters get 95% group-bootstrap intervals for
both, metadata values point estimates (intervals for the worst value of each column, to
bound the cost). The worst subgroup of each kind is **flagged** when its
gap's interval lies below 0. Small subgroups (< ``min_n`` images) are listed, never flagged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medsig.errors import DataError
from medsig.evaluate.bootstrap import Resampler

PREFERRED = ("classification/macro_auc", "zeroshot/macro_auc", "zeroshot/accuracy")
MAX_VALUES = 12  # metadata columns with more distinct values are not audited (ids, ages)
MIN_N = 20


def _value(fn: Callable[..., float], arrays: Sequence[np.ndarray], idx: np.ndarray) -> float:
    if len(idx) == 0:
        return float("nan")
    try:
        v = float(fn(*[a[idx] for a in arrays]))
    except (ValueError, ZeroDivisionError, DataError, IndexError):
        return float("nan")
    return v if np.isfinite(v) else float("nan")


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def audit_partition(part: np.ndarray, fn: Callable[..., float], arrays: Sequence[np.ndarray],
                    groups: np.ndarray | None, n_boot: int = 200, seed: int = 0,
                    min_n: int = MIN_N, all_intervals: bool = True) -> dict[str, Any]:
    """Metric, interval and gap to the rest for every value of ``part`` (one per row).

    ``all_intervals=False``: point estimates for every value, intervals only for the worst
    (the one that can be flagged) - the bootstrap cost of one subgroup instead of all.
    """
    part = np.asarray(part).astype(str)
    out: dict[str, Any] = {}
    for v in sorted(set(part.tolist())):
        rows = np.nonzero(part == v)[0]
        point, rest_point = _value(fn, arrays, rows), _value(fn, arrays, np.nonzero(part != v)[0])
        out[v] = {"n": int(len(rows)),
                  "groups": int(len(set(groups[rows].tolist()))) if groups is not None
                  else int(len(rows)),
                  "point": point, "low": float("nan"), "high": float("nan"),
                  "rest": rest_point, "gap": point - rest_point, "gap_low": float("nan"),
                  "gap_high": float("nan"), "small": bool(len(rows) < min_n)}
    worst = _worst(out)
    chosen = list(out) if all_intervals else ([worst["value"]] if worst else [])
    boot = {v: ([], []) for v in chosen}
    rs = Resampler(len(part), groups, seed)
    for _ in range(n_boot if chosen else 0):
        idx = rs.draw()
        inside = part[idx]
        for v in chosen:
            mask = inside == v
            a, b = _value(fn, arrays, idx[mask]), _value(fn, arrays, idx[~mask])
            boot[v][0].append(a)
            boot[v][1].append(a - b)
    for v, (metric, gap) in boot.items():
        out[v]["low"], out[v]["high"] = _interval(np.asarray(metric, dtype=float))
        out[v]["gap_low"], out[v]["gap_high"] = _interval(np.asarray(gap, dtype=float))
    return {"subgroups": out, "worst": _worst(out)}


def _worst(per: dict[str, Any]) -> dict[str, Any] | None:
    eligible = {v: r for v, r in per.items() if not r["small"] and np.isfinite(r["gap"])}
    if not eligible:
        return None
    v = min(eligible, key=lambda k: eligible[k]["gap"])
    r = eligible[v]
    return {"value": v, "gap": r["gap"], "gap_low": r["gap_low"], "gap_high": r["gap_high"],
            "flagged": bool(np.isfinite(r["gap_high"]) and r["gap_high"] < 0)}


def embedding_clusters(embeddings: np.ndarray, k: int | None = None, seed: int = 0
                       ) -> np.ndarray:
    """k-means cluster ids ("c0".."c{k-1}") of L2-normalised embeddings.

    Default k: about one cluster per 60 images, between 2 and 8.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = k or int(np.clip(len(x) // 60, 2, 8))
    k = min(k, len(x))
    ids = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
    return np.array([f"c{i}" for i in ids], dtype=object)


def pick_metric(available: Sequence[str], model_has: Callable[[str], bool]) -> str | None:
    for m in PREFERRED:
        if m in available and model_has(m):
            return m
    return None


def audit(col: Any, hl: Any, outputs: dict[str, Any], columns: Sequence[str] | None = None,
          k: int | None = None, n_boot: int = 200, seed: int = 0, min_n: int = MIN_N
          ) -> dict[str, Any]:
    """The hidden-subgroup audit of every model (see module docstring); JSON-ready."""
    cols = [c for c in (columns if columns is not None else _metadata(col))
            if c in col.frame.columns]
    report: dict[str, Any] = {"min_n": min_n, "n_boot": n_boot, "models": {}}
    for model, out in outputs.items():
        metric = pick_metric(list(hl.items), lambda m, mod=model: mod in hl.items[m])
        if metric is None:
            continue
        fn, arrays, _, _ = hl.items[metric][model]
        res: dict[str, Any] = {"metric": metric,
                               "clusters": audit_partition(
                                   embedding_clusters(out.image, k, seed), fn, arrays,
                                   col.groups, n_boot, seed, min_n),
                               "columns": {}}
        for c in cols:
            values = _column(col, c)
            if 1 < len(set(values.tolist())) <= MAX_VALUES:
                res["columns"][c] = audit_partition(values, fn, arrays, col.groups, n_boot,
                                                    seed, min_n, all_intervals=False)
        report["models"][model] = res
    return report


def _metadata(col: Any) -> list[str]:
    meta = col.spec.metadata
    return list(meta) if meta is not None else [str(c) for c in col.frame.columns]


def _column(col: Any, column: str) -> np.ndarray:
    missing = set(col.spec.missing_values)
    raw = [str(v).strip() for v in col.frame[column].tolist()]
    return np.array(["MISSING" if v in missing or v.lower() == "nan" else v for v in raw],
                    dtype=object)


def audit_section(metrics: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Report blocks: flagged subgroups first, then each model's cluster table."""
    from medsig.evaluate.figures import fmt

    aud = metrics.get("audit") or {}
    if not aud.get("models"):
        return []
    blocks: list[tuple[Any, ...]] = [
        ("h", 2, "Hidden subgroups (embedding clusters and metadata columns)"),
        ("p", "Each subgroup's metric against the rest of the split; a subgroup is flagged "
              "when the 95% group-bootstrap interval of its gap lies below 0. Clusters are "
              f"k-means groups of the model's image embeddings; subgroups under "
              f"{aud.get('min_n')} images are listed but never flagged.")]
    flags = []
    for model, res in aud["models"].items():
        kinds = [("clusters", res["clusters"])] + list(res["columns"].items())
        for kind, part in kinds:
            w = part.get("worst")
            if w and w["flagged"]:
                flags.append([model, res["metric"], kind, w["value"], fmt(w["gap"]),
                              f"[{fmt(w['gap_low'])}, {fmt(w['gap_high'])}]"])
    blocks.append(("table", ["model", "metric", "subgroup kind", "worst", "gap", "95% CI"],
                   flags) if flags else ("p", "No subgroup's gap interval excludes 0."))
    for model, res in aud["models"].items():
        rows = [[v, r["n"], r["groups"], f"{fmt(r['point'])} [{fmt(r['low'])}, "
                 f"{fmt(r['high'])}]", fmt(r["gap"]), f"[{fmt(r['gap_low'])}, "
                 f"{fmt(r['gap_high'])}]"] for v, r in res["clusters"]["subgroups"].items()]
        blocks += [("h", 3, f"{model}: clusters ({res['metric']})"),
                   ("table", ["cluster", "images", "groups", "metric (95% CI)", "gap to rest",
                              "gap 95% CI"], rows)]
        worst = [[c, w["value"], part["subgroups"][w["value"]]["n"], fmt(w["gap"]),
                  f"[{fmt(w['gap_low'])}, {fmt(w['gap_high'])}]",
                  "flagged" if w["flagged"] else "–"]
                 for c, part in res["columns"].items() if (w := part.get("worst"))]
        if worst:
            blocks.append(("table", ["column", "worst value", "images", "gap to rest",
                                     "gap 95% CI", "flag"], worst))
    return blocks
