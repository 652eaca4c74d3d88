"""Statistics over the tasks' headline metrics: group-bootstrap CIs, paired differences
against the first model, a winner per metric, and per-subgroup point estimates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medsig.data.collection import Collection
from medsig.errors import DataError
from medsig.evaluate.bootstrap import bootstrap_ci, paired_bootstrap
from medsig.evaluate.tasks import Headlines
from medsig.metrics.classification import nanmean

NOT_RECORDED = "not recorded"  # a subgroup / colour value that is missing in the table


def _ci(fn: Callable[..., float], arrays: tuple, groups: np.ndarray, n_boot: int, seed: int,
        bias_correct: bool = False, keep: bool = False) -> dict[str, Any]:
    """Percentile group-bootstrap CI; with ``bias_correct`` the interval is shifted by the
    bootstrap bias (mean of the resamples - point estimate) and clipped to [0, 1], the range
    of the one such statistic (NMI). ``keep``: also the resample values (``replicates``, NaN
    where undefined; the same resamples for every model of one evaluation)."""
    values: list[float] = []

    def recording(*a: np.ndarray) -> float:
        try:
            values.append(float(fn(*a)))
        except (ValueError, ZeroDivisionError):
            values.append(float("nan"))  # kept in step with the resamples
            raise
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
                       low=min(max(res["low"] - bias, 0.0), 1.0),
                       high=min(max(res["high"] - bias, 0.0), 1.0))
    if keep:
        res["replicates"] = values[1:]
    return res


def validity(hl: Headlines, order: Sequence[str], groups: np.ndarray, n_boot: int,
             seed: int, replicates: bool = False
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Group-bootstrap CIs, paired differences vs the first model, and a winner per metric
    (``replicates``: each CI also holds its resample values, see ``_ci``)."""
    headline: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    winners: dict[str, Any] = {}
    first = order[0]
    for metric, per in hl.items.items():
        headline[metric] = {m: _ci(fn, arrays, groups, n_boot, seed, corr, replicates)
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
        values = np.array([NOT_RECORDED if v in missing or v.lower() == "nan" else v
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
