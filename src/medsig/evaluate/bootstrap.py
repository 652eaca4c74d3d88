"""Bootstrap confidence intervals that resample groups (cases / patients), not rows.

With ``groups``, each resample draws groups with replacement and includes every row of a
drawn group (rows of one patient are not independent). Resamples where the metric is
undefined (NaN, or a ValueError such as AUC with one class) are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medsig.errors import ConfigError, DataError


@dataclass
class BootstrapResult:
    """Point estimate and percentile interval; unpacks as ``point, low, high``."""

    point: float
    low: float
    high: float
    alpha: float
    n_boot: int
    n_skipped: int
    unit: str  # "groups" or "rows"
    n_units: int

    def __iter__(self):  # noqa: ANN204 - tuple-like unpacking
        return iter((self.point, self.low, self.high))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Resampler:
    """Draws bootstrap row indices, by row or by group (rows of a drawn group all included)."""

    def __init__(self, n: int, groups: Any = None, seed: int = 0) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        if groups is None:
            self.order = None
            self.n_units = n
            return
        g = np.asarray(groups)
        if g.shape != (n,):
            raise DataError(f"groups has shape {g.shape}, expected ({n},)")
        if g.dtype.kind == "O":
            g = g.astype(str)
        _, codes = np.unique(g, return_inverse=True)
        self.order = np.argsort(codes, kind="stable")
        self.counts = np.bincount(codes)
        self.starts = np.cumsum(self.counts) - self.counts
        self.n_units = len(self.counts)

    def draw(self) -> np.ndarray:
        if self.order is None:
            return self.rng.integers(0, self.n, self.n)
        s = self.rng.integers(0, self.n_units, self.n_units)
        lens = self.counts[s]
        shift = self.starts[s] - (np.cumsum(lens) - lens)
        return self.order[np.arange(lens.sum()) + np.repeat(shift, lens)]


def _arrays(arrays: Sequence[Any]) -> tuple[list[np.ndarray], int]:
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise DataError("bootstrap needs at least one array")
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise DataError(f"bootstrap arrays differ in length: {[len(a) for a in arrs]}")
    return arrs, n


def _check(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")


def _value(fn: Callable[..., float], arrays: Sequence[np.ndarray]) -> float:
    try:
        return float(fn(*arrays))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def _replicates(rs: Resampler, n_boot: int, value: Callable[[np.ndarray], float]
                ) -> np.ndarray:
    """``value(idx)`` on each of `n_boot` resamples, drawn in order."""
    values = np.empty(n_boot)
    for i in range(n_boot):
        values[i] = value(rs.draw())
    return values


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    ok = values[np.isfinite(values)]
    if not ok.size:
        return float("nan"), float("nan")
    low, high = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, groups: Any = None,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric_fn(*arrays)`` (arrays indexed along axis 0)."""
    _check(n_boot, alpha)
    arrs, n = _arrays(arrays)
    point = float(metric_fn(*arrs))
    rs = Resampler(n, groups, seed)
    values = _replicates(rs, n_boot, lambda idx: _value(metric_fn, [a[idx] for a in arrs]))
    low, high = _interval(values, alpha)
    return BootstrapResult(point, low, high, alpha, n_boot, int((~np.isfinite(values)).sum()),
                           "rows" if groups is None else "groups", rs.n_units)


def paired_bootstrap(metric_fn: Callable[..., float], arrays_a: Sequence[Any],
                     arrays_b: Sequence[Any], groups: Any = None, n_boot: int = 1000,
                     alpha: float = 0.05, seed: int = 0, names: tuple[str, str] = ("A", "B"),
                     higher_is_better: bool = True) -> dict[str, Any]:
    """Difference metric(A) - metric(B) on the same resamples (same rows / groups) with a CI.

    ``arrays_a`` / ``arrays_b``: the metric's arguments for each model, e.g. ``(y, scores_a)``
    and ``(y, scores_b)``. Significant when the interval excludes 0.
    """
    _check(n_boot, alpha)
    arrs_a, n = _arrays(arrays_a)
    arrs_b, n_b = _arrays(arrays_b)
    if n_b != n:
        raise DataError(f"paired bootstrap needs the same rows: {n} vs {n_b}")
    a, b = float(metric_fn(*arrs_a)), float(metric_fn(*arrs_b))
    diff = a - b
    rs = Resampler(n, groups, seed)
    values = _replicates(rs, n_boot, lambda idx: _value(metric_fn, [x[idx] for x in arrs_a])
                         - _value(metric_fn, [x[idx] for x in arrs_b]))
    low, high = _interval(values, alpha)
    ok = values[np.isfinite(values)]
    p = float(min(1.0, 2 * min((ok <= 0).mean(), (ok >= 0).mean()))) if ok.size else float("nan")
    significant = bool(low > 0 or high < 0)
    pct = f"{100 * (1 - alpha):g}% CI"
    if significant:
        winner = names[0] if (diff > 0) == higher_is_better else names[1]
        verdict = f"{winner} better ({diff:+.3f}, {pct} {low:.3f} to {high:.3f})"
    else:
        verdict = f"not significant ({pct} {low:.3f} to {high:.3f})"
    return {"a": a, "b": b, "difference": diff, "low": low, "high": high,
            "significant": significant, "verdict": verdict, "p_value": p, "alpha": alpha,
            "n_boot": n_boot, "n_skipped": int((~np.isfinite(values)).sum()),
            "unit": "rows" if groups is None else "groups", "n_units": rs.n_units,
            "names": list(names)}
