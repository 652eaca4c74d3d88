"""What a fine-tune cost: the spec's retention check, and choosing a blend alpha on val.

A spec may name a retention check (``retention: {metric, spec, split}``): one headline
metric of ``medsig eval`` (e.g. ``clustering/nmi:category``, ``zeroshot/accuracy``,
``retrieval/image_to_text_recall@1``), measured on another collection (``spec``, e.g. the
broad task or a reference set) or on this one. ``evaluate`` then reports it for every model
next to the in-domain metrics; ``choose_alpha`` evaluates blends (``medsig.models.blend``)
on the validation split and picks the alpha that keeps the in-domain gain while recovering
the retention metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsig.errors import ConfigError
from medsig.spec import DatasetSpec

KEEP, RECOVER = 0.9, 0.9


def retention_target(spec: DatasetSpec, split: str) -> tuple[str, Path, str] | None:
    """(metric, spec path, split) of the spec's retention check, or None."""
    r = spec.retention
    if not r:
        return None
    other = (spec.base_dir / r["spec"]).resolve() if r.get("spec") else spec.path
    if other is None:
        raise ConfigError("retention: the spec has no file to resolve 'spec' against")
    return r["metric"], Path(other), r.get("split", split)


def retention_check(spec: DatasetSpec, models: dict[str, str], split: str,
                    out: Path | None, evaluate: Callable[..., dict[str, Any]],
                    **kwargs: Any) -> dict[str, Any] | None:
    """The retention metric (95% CI) of every model, measured with ``evaluate``
    (``medsig.evaluate.run.evaluate``, passed in by it); None when the spec names none."""
    from medsig.evaluate import TASKS

    target = retention_target(spec, split)
    if target is None:
        return None
    metric, other, rsplit = target
    task = metric.split("/")[0]
    if task not in TASKS:
        raise ConfigError(f"retention.metric '{metric}': the task must be one of "
                          f"{', '.join(TASKS)}", file=spec.path)
    res = evaluate(other, models, tasks=[task], split=rsplit,
                   out=out / "retention" if out is not None else None, report=False,
                   retention=False, audit=False, purpose="retention", **kwargs)
    per = (res.get("headline") or {}).get(metric)
    if per is None:
        known = ", ".join(res.get("headline") or {}) or "none"
        raise ConfigError(f"retention.metric '{metric}' was not measured (measured: {known})",
                          file=spec.path)
    return {"metric": metric, "spec": str(other), "split": rsplit, "models": per,
            "paired": (res.get("paired") or {}).get(metric, {})}


def _point(d: dict[str, Any] | None) -> float:
    value = (d or {}).get("point")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) \
        else float("nan")


def _reps(d: dict[str, Any] | None) -> np.ndarray | None:
    """The bootstrap resample values of one CI (None -> NaN), or None when not kept."""
    values = (d or {}).get("replicates")
    return None if values is None else np.array(
        [np.nan if v is None else v for v in values], dtype=np.float64)


def _ratio_ci(num: tuple[Any, Any], den: tuple[Any, Any], alpha: float = 0.05
              ) -> dict[str, float] | None:
    """Percentile interval of (a − b) / (c − d) over paired resamples (``num`` = (a, b),
    ``den`` = (c, d), each a replicate array); None without replicates."""
    arrays = [*num, *den]
    if any(a is None for a in arrays) or len({len(a) for a in arrays}) != 1:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (arrays[0] - arrays[1]) / (arrays[2] - arrays[3])
    ok = ratio[np.isfinite(ratio)]
    if not ok.size:
        return None
    low, high = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(low), "high": float(high), "n_boot": int(ok.size)}


def _strip(d: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if d is None else {k: v for k, v in d.items() if k != "replicates"}


def alpha_table(in_domain: dict[str, Any], retention: dict[str, Any],
                alphas: dict[str, float]) -> list[dict[str, Any]]:
    """Per alpha: in-domain gain kept (vs alpha 0 -> 1) and retention kept / recovered.

    ``gain_kept`` = (m(α) − m(0)) / (m(1) − m(0)); ``retained`` = r(α) / r(0);
    ``drop_recovered`` = (r(α) − r(1)) / (r(0) − r(1)). When the CIs hold their bootstrap
    resamples (``evaluate(..., replicates=True)``: the same resamples for every model), each
    ratio also gets a 95% percentile interval (``<name>_ci``) over those paired resamples.
    """
    by_alpha = sorted(alphas.items(), key=lambda kv: kv[1])
    first, last = by_alpha[0][0], by_alpha[-1][0]
    m0, m1 = _point(in_domain.get(first)), _point(in_domain.get(last))
    r0, r1 = _point(retention.get(first)), _point(retention.get(last))
    bm0, bm1 = _reps(in_domain.get(first)), _reps(in_domain.get(last))
    br0, br1 = _reps(retention.get(first)), _reps(retention.get(last))
    zero = None if br0 is None else np.zeros_like(br0)
    rows = []
    for name, alpha in by_alpha:
        m, r = _point(in_domain.get(name)), _point(retention.get(name))
        bm, br = _reps(in_domain.get(name)), _reps(retention.get(name))
        rows.append({"model": name, "alpha": alpha, "in_domain": _strip(in_domain.get(name)),
                     "retention": _strip(retention.get(name)),
                     "gain_kept": (m - m0) / (m1 - m0) if m1 != m0 else float("nan"),
                     "retained": r / r0 if r0 else float("nan"),
                     "drop_recovered": (r - r1) / (r0 - r1) if r0 != r1 else float("nan"),
                     "gain_kept_ci": _ratio_ci((bm, bm0), (bm1, bm0)),
                     "retained_ci": _ratio_ci((br, zero), (br0, zero)),
                     "drop_recovered_ci": _ratio_ci((br, br1), (br0, br1))})
    return rows


def ratio_text(value: float | None, interval: dict[str, Any] | None) -> str:
    """A ratio of ``alpha_table`` as a percentage with its interval: ``91% [68, 105]``."""
    if value is None or not math.isfinite(value):
        return "-"
    inner = f" [{100 * interval['low']:.0f}, {100 * interval['high']:.0f}]" if interval else ""
    return f"{round(100 * value) + 0:d}%{inner}"


def pick_alpha(rows: Sequence[dict[str, Any]], keep: float = KEEP, recover: float = RECOVER
               ) -> dict[str, Any]:
    """The alpha keeping >= ``keep`` of the gain with >= ``recover`` of the retention metric
    (the best-retaining such alpha); else the best compromise, flagged."""
    def ok(row: dict[str, Any]) -> bool:
        return row["gain_kept"] >= keep and row["retained"] >= recover

    if rows and not _point(rows[-1]["in_domain"]) > _point(rows[0]["in_domain"]):
        return {"alpha": None, "model": None, "meets": False,
                "note": "the fine-tune shows no in-domain gain on this split"}

    good = [r for r in rows if ok(r)]
    if good:
        best = max(good, key=lambda r: (r["retained"], r["alpha"]))
        return {"alpha": best["alpha"], "model": best["model"], "meets": True}
    scored = [r for r in rows if math.isfinite(min(r["gain_kept"], r["retained"]))]
    if not scored:
        return {"alpha": None, "model": None, "meets": False}
    best = max(scored, key=lambda r: min(r["gain_kept"], r["retained"]))
    return {"alpha": best["alpha"], "model": best["model"], "meets": False}


def retention_section(metrics: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Report blocks: the retention metric per model."""
    from medsig.evaluate.figures import fmt, fmt_ci

    ret = metrics.get("retention")
    if not ret:
        return []
    models = list(metrics.get("model_order") or ret["models"])
    rows = [[m, fmt_ci(ret["models"].get(m)),
             fmt((ret.get("paired") or {}).get(m, {}).get("difference")),
             (ret.get("paired") or {}).get(m, {}).get("verdict", "–")] for m in models]
    return [("h", 2, f"Retention: {ret['metric']}"),
            ("p", f"What the fine-tunes must not forget, as the spec names it: "
                  f"{ret['metric']} on split '{ret['split']}' of {ret['spec']}."),
            ("table", ["model", "value (95% CI)", f"difference vs {models[0]}", "verdict"],
             rows)]
