"""What a clinician reads first: for every binary decision at the saved threshold, the test
prevalence and sensitivity, specificity, PPV and NPV with 95 % group-bootstrap intervals
(whole cases resampled), under readable label names. PPV and NPV depend on the prevalence:
they hold for a population with this split's prevalence only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medsig.data.collection import Collection
from medsig.evaluate.bootstrap import bootstrap_ci
from medsig.models.heads import Head

MEASURES = ("prevalence", "sensitivity", "specificity", "ppv", "npv")


def display_name(name: str) -> str:
    """A label's readable name: 'infection_risk' -> 'Infection risk'."""
    text = name.replace("_", " ").replace("-", " ").strip()
    return text[:1].upper() + text[1:] if text else name


def _rate(kind: str, t: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def fn(y: np.ndarray, s: np.ndarray) -> float:
        pred = s >= t
        num, den = {
            "prevalence": (y.sum(), len(y)),
            "sensitivity": ((pred & (y == 1)).sum(), (y == 1).sum()),
            "specificity": ((~pred & (y == 0)).sum(), (y == 0).sum()),
            "ppv": ((pred & (y == 1)).sum(), pred.sum()),
            "npv": ((~pred & (y == 0)).sum(), (~pred).sum()),
        }[kind]
        return float(num) / float(den) if den else float("nan")

    return fn


def _decisions(h: Head, col: Collection) -> list[tuple[str, str, int, float]]:
    """(row title, positive state, column, threshold) per binary decision of a head."""
    if h.kind == "binary":
        return [(display_name(h.name), h.states[1], h.offset, h.thresholds[0])]
    if h.kind == "multilabel":
        return [(f"{display_name(h.name)}: {c}", c, h.offset + j, h.thresholds[j])
                for j, c in enumerate(h.classes)]
    return []


def clinical_tables(col: Collection, out: Any, n_boot: int, seed: int
                    ) -> dict[str, Any] | None:
    """Per decision: threshold, n, prevalence, sensitivity, specificity, PPV, NPV (+ CIs)."""
    if out.probs is None:
        return None
    rows: dict[str, Any] = {}
    for h in (Head.of(x) for x in out.info["heads"]):
        if h.name not in col.labels:
            continue
        targets = np.asarray(col.labels[h.name].targets)
        for j, (title, state, column, t) in enumerate(_decisions(h, col)):
            y = targets if h.kind == "binary" else targets[:, j]
            keep = y >= 0
            yk, s, g = y[keep].astype(np.int8), out.probs[keep, column], col.groups[keep]
            entry: dict[str, Any] = {"label": h.name, "state": state, "threshold": float(t),
                                     "n": int(keep.sum()), "n_pos": int(yk.sum())}
            for m in MEASURES:
                r = bootstrap_ci(_rate(m, t), yk, s, groups=g, n_boot=n_boot, seed=seed)
                entry[m] = {"value": r.point, "low": r.low, "high": r.high}
            rows[title] = entry
    return rows


def report_blocks(metrics: dict[str, Any]) -> list[tuple]:
    """The report section (first after the headline metrics)."""
    per_model = {m: r for m, r in (metrics.get("clinical") or {}).items() if r}
    if not per_model:
        return []
    blocks: list[tuple] = [
        ("h", 2, "For clinicians: decisions at the saved thresholds"),
        ("p", "Each row is one yes / no decision as the model makes it (the saved threshold; "
              "calibrated probabilities when the model has temperatures). Prevalence is the "
              "share of positives in this split: PPV and NPV hold only at that prevalence. "
              "Brackets: 95 % group-bootstrap intervals.")]
    for m, rows in per_model.items():
        table = []
        for title, e in rows.items():
            table.append([title, e["state"], f"{e['threshold']:.3f}", f"{e['n']} ({e['n_pos']}+)",
                          *[_ci(e[k]) for k in MEASURES]])
        blocks.append(("table", [f"{m}: decision", "positive state", "threshold", "n (pos)",
                                 "prevalence", "sensitivity", "specificity", "PPV", "NPV"],
                       table))
    return blocks


def _ci(r: dict[str, float]) -> str:
    v, lo, hi = r.get("value"), r.get("low"), r.get("high")
    if v is None or not np.isfinite(v):
        return "–"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
