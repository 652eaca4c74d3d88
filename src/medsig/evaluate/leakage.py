"""Split leakage: a group (case / patient) in two splits, or near-duplicate images across splits."""

from __future__ import annotations

from typing import Any

import numpy as np

from medsig.data.collection import split_key
from medsig.data.vectors import split_near_duplicates
from medsig.errors import DataError


def _strings(values: Any, what: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(strings, present mask); None / NaN / '' are missing."""
    v = np.asarray(values, dtype=object)
    if v.ndim != 1 or (n is not None and len(v) != n):
        raise DataError(f"{what} must be 1-D with {n} entries, got shape {v.shape}")
    ok = np.array([x is not None and x == x and str(x) != "" for x in v.tolist()], bool)
    return np.array([str(x) if o else "" for x, o in zip(v.tolist(), ok)], dtype=object), ok


def leakage_report(groups: Any, split: Any, emb: Any = None, dup_threshold: float = 0.98,
                   chunk_size: int = 4096, max_examples: int = 10) -> dict[str, Any]:
    """Counts per split, groups found in more than one split, and (with ``emb``) rows whose
    image has a near-duplicate (cosine >= ``dup_threshold``) in an earlier split.

    Rows with no split (None / '') are ignored. Split pairs are named "train/test" etc.
    """
    s, has_split = _strings(split, "split")
    g, has_group = _strings(groups, "groups", len(s))
    if not has_group[has_split].all():
        row = int(np.nonzero(has_split & ~has_group)[0][0])
        raise DataError(f"row {row + 1} has a split but no group")
    rows = np.nonzero(has_split)[0]
    names = sorted(set(s[rows].tolist()), key=split_key)
    per_split = {n: {"rows": int((s[rows] == n).sum()),
                     "groups": len(set(g[rows][s[rows] == n].tolist()))} for n in names}
    where: dict[str, set[str]] = {}
    for gi, si in zip(g[rows].tolist(), s[rows].tolist()):
        where.setdefault(gi, set()).add(si)
    leaked = {k: sorted(v, key=split_key) for k, v in where.items() if len(v) > 1}
    pairs: dict[str, int] = {}
    for sp in leaked.values():
        for i, a in enumerate(sp):
            for b in sp[i + 1:]:
                pairs[f"{a}/{b}"] = pairs.get(f"{a}/{b}", 0) + 1
    leaked_rows = int(np.isin(g[rows], list(leaked)).sum()) if leaked else 0
    report: dict[str, Any] = {
        "n_rows": int(len(rows)), "n_groups": len(where), "splits": per_split,
        "n_leaked_groups": len(leaked), "n_leaked_rows": leaked_rows,
        "leaked_groups": {k: leaked[k] for k in sorted(leaked)[:max_examples]},
        "pairs": pairs,
    }
    if emb is not None:
        report["near_duplicates"] = split_near_duplicates(emb, s, rows, names, dup_threshold,
                                                     chunk_size, max_examples)
    return report


def check_leakage(groups: Any, split: Any) -> None:
    """Raise DataError naming the first leaked groups and their splits, if any."""
    rep = leakage_report(groups, split, max_examples=5)
    n = rep["n_leaked_groups"]
    if n:
        shown = ", ".join(f"'{k}' ({', '.join(v)})" for k, v in rep["leaked_groups"].items())
        more = f" and {n - len(rep['leaked_groups'])} more" if n > len(rep["leaked_groups"]) else ""
        raise DataError(f"{n} group(s) appear in more than one split: {shown}{more}")
