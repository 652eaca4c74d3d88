"""Honest splits: by group (case / patient), stratified over all labels together.

Iterative stratification (Sechidis et al., 2011) run over *groups*: each group carries the
per-class image counts of its rows, so no group is ever cut across splits and every label's
class proportions follow the requested ratios. Classes with at least `min_groups` groups are
then guaranteed in every split by moving groups where needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medsig.data.collection import SPLITS, Collection, load_collection
from medsig.errors import ConfigError, DataError


@dataclass
class SplitResult:
    split: np.ndarray  # (n,) "train" / "val" / "test" per row
    seed: int
    ratios: tuple[float, float, float]

    def counts(self) -> dict[str, int]:
        return {s: int((self.split == s).sum()) for s in SPLITS}


def split_collection(
    collection: Collection,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    min_groups: int = 3,
    together: np.ndarray | None = None,
) -> SplitResult:
    """Assign train / val / test to every row, by group, stratified over every label.

    ``together``: (m, 2) row pairs that must land in the same split even though their
    groups differ (near-duplicate images, ``medsig.data.duplicates``): their groups are
    split as one unit.
    """
    ratios_arr = np.asarray(ratios, dtype=np.float64)
    if ratios_arr.shape != (3,) or (ratios_arr < 0).any() or ratios_arr.sum() <= 0:
        raise ConfigError(f"split ratios must be three non-negative numbers, got {ratios}")
    ratios_arr = ratios_arr / ratios_arr.sum()
    group_ids, inverse = np.unique(collection.groups.astype(str), return_inverse=True)
    if together is not None and len(together):
        inverse = _merge_units(inverse, np.asarray(together, dtype=np.int64))
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    if n_groups < 3:
        raise DataError(f"only {n_groups} group(s): cannot make three splits by group",
                        file=collection.spec.path)
    y = collection.label_matrix().astype(np.float64)
    group_y = np.zeros((n_groups, y.shape[1]))
    np.add.at(group_y, inverse, y)
    sizes = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    assign = _iterative_stratification(group_y, sizes, ratios_arr, rng)
    assign = _ensure_presence(assign, group_y > 0, ratios_arr, min_groups)
    split = np.array([SPLITS[k] for k in assign[inverse]], dtype=object)
    return SplitResult(split, seed, tuple(float(r) for r in ratios_arr))


def _merge_units(inverse: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Unit index per row after joining the groups of every pair (union-find), 0..k-1."""
    parent = np.arange(int(inverse.max()) + 1)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    for r1, r2 in pairs.tolist():
        a, b = root(int(inverse[r1])), root(int(inverse[r2]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(a) for a in range(len(parent))])
    return np.unique(roots, return_inverse=True)[1][inverse]


def _iterative_stratification(y: np.ndarray, sizes: np.ndarray, ratios: np.ndarray,
                              rng: np.random.Generator) -> np.ndarray:
    """Sechidis' algorithm on weighted examples (groups). Returns the split index per group."""
    n, k = y.shape
    assign = np.full(n, -1, dtype=np.int64)
    order = rng.permutation(n)  # random tie-breaking among equal groups
    desired = ratios * sizes.sum()  # images each split still wants
    desired_label = ratios[:, None] * y.sum(axis=0)[None, :]  # (3, k)
    remaining = y.copy()
    left = np.ones(n, dtype=bool)
    while left.any():
        label_left = remaining[left].sum(axis=0) if k else np.zeros(0)
        active = np.nonzero(label_left > 0)[0]
        if len(active) == 0:  # groups with no labels: fill by size
            for g in order[left[order]]:
                s = _pick(desired, rng)
                assign[g] = s
                desired[s] -= sizes[g]
            break
        lab = active[np.argmin(label_left[active])]  # rarest label first
        carriers = order[left[order] & (y[order, lab] > 0)]
        for g in carriers:
            want = desired_label[:, lab]
            best = np.flatnonzero(want == want.max())
            s = best[0] if len(best) == 1 else best[_pick(desired[best], rng)]
            assign[g] = s
            left[g] = False
            desired[s] -= sizes[g]
            desired_label[s] -= y[g]
            remaining[g] = 0
    return assign


def _pick(values: np.ndarray, rng: np.random.Generator) -> int:
    best = np.flatnonzero(values == values.max())
    return int(best[0] if len(best) == 1 else rng.choice(best))


def _ensure_presence(assign: np.ndarray, has: np.ndarray, ratios: np.ndarray,
                     min_groups: int) -> np.ndarray:
    """Move groups so every class with >= min_groups groups is in every (non-empty) split."""
    assign = assign.copy()
    targets = [s for s in range(3) if ratios[s] > 0]
    n_carriers = has.sum(axis=0)
    for _ in range(3 * has.shape[1] + 10):
        moved = False
        for lab in np.nonzero(n_carriers >= min_groups)[0]:
            carriers = np.nonzero(has[:, lab])[0]
            per_split = np.array([(assign[carriers] == s).sum() for s in range(3)])
            for s in targets:
                if per_split[s] > 0:
                    continue
                donor = _donor(assign, has, carriers, per_split, min_groups)
                if donor is None:
                    continue
                per_split[assign[donor]] -= 1
                assign[donor] = s
                per_split[s] += 1
                moved = True
        if not moved:
            break
    return assign


def _donor(assign: np.ndarray, has: np.ndarray, carriers: np.ndarray, per_split: np.ndarray,
           min_groups: int) -> int | None:
    """A carrier group from the split with the most carriers whose move keeps other classes
    present (prefers groups carrying the fewest classes)."""
    for s in np.argsort(-per_split):
        if per_split[s] < 2:
            return None
        candidates = carriers[assign[carriers] == s]
        candidates = candidates[np.argsort(has[candidates].sum(axis=1), kind="stable")]
        for g in candidates:
            others = np.nonzero(has[g])[0]
            safe = True
            for lab in others:
                if has[:, lab].sum() < min_groups:
                    continue
                if (has[assign == s, lab]).sum() < 2:
                    safe = False
                    break
            if safe:
                return int(g)
    return None


def split_report(collection: Collection, split: np.ndarray) -> pd.DataFrame:
    """Per-split counts of rows, groups and every class of every label (plus MISSING)."""
    rows = []
    for s in SPLITS:
        mask = split == s
        rows.append({"label": "(rows)", "class": "", "split": s, "count": int(mask.sum())})
        rows.append({"label": "(groups)", "class": "", "split": s,
                     "count": len(set(collection.groups[mask]))})
        for name, lab in collection.labels.items():
            onehot = lab.onehot()
            names = [lab.classes[1]] if lab.kind == "binary" else lab.classes
            for j, cls in enumerate(names):
                rows.append({"label": name, "class": cls, "split": s,
                             "count": int(onehot[mask, j].sum())})
            rows.append({"label": name, "class": "MISSING", "split": s,
                         "count": int(lab.missing[mask].sum())})
    table = pd.DataFrame(rows).pivot_table(index=["label", "class"], columns="split",
                                           values="count", sort=False)
    return table[list(SPLITS)].astype(int).reset_index()


def write_split(collection: Collection, result: SplitResult, out_dir: str | Path
                ) -> tuple[Path, Path]:
    """Write `splits.csv` (id, group, split) and `split_report.csv` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assignment = pd.DataFrame({"id": collection.ids, "group": collection.groups,
                               "split": result.split})
    paths = (out_dir / "splits.csv", out_dir / "split_report.csv")
    for frame, path in zip((assignment, split_report(collection, result.split)), paths):
        tmp = path.with_suffix(".csv.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
    return paths


def set_spec_splits(spec_path: Path, splits_file: str) -> None:
    """Point the spec at a splits file, editing only the `splits:` line (comments kept)."""
    lines = spec_path.read_text().splitlines()
    new = f"splits: {splits_file}"
    for i, line in enumerate(lines):
        if line.startswith("splits:"):
            lines[i] = new
            break
    else:
        lines.append(new)
    tmp = spec_path.with_suffix(spec_path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(spec_path)


@dataclass
class SplitRun:
    """What `split_spec` did: the split, the files written, the near-duplicate check."""

    result: SplitResult
    splits_path: Path
    report_path: Path
    duplicates: pd.DataFrame | None  # pairs kept together; None when the check was off
    duplicates_file: Path | None
    duplicate_threshold: float
    unreadable: int = 0
    label_conflicts: list[str] = field(default_factory=list)  # groups whose rows disagree


def split_spec(spec_path: str | Path, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
               seed: int = 0, out_dir: str | Path | None = None, update_spec: bool = True,
               force: bool = False, duplicates: float = 0.99) -> SplitRun:
    """`medsig data split` as a function: near-duplicate check (pairs of different groups
    kept in one split, listed in near_duplicates.csv), group-wise stratified split,
    splits.csv + split_report.csv, and (``update_spec``) the spec pointed at them."""
    from medsig.data.duplicates import write_duplicate_table

    spec_path = Path(spec_path)
    collection = load_collection(spec_path)
    if collection.spec.split_column and not force:
        raise ConfigError(f"the spec names split column '{collection.spec.split_column}'; "
                          "it is kept (use --force to compute a new split)")
    if not 0 <= duplicates <= 1:
        raise ConfigError(f"--duplicates must be in [0, 1] (0: no check), got {duplicates}")
    out = Path(out_dir) if out_dir else spec_path.resolve().parent
    table, file, unreadable, together = None, None, 0, None
    if duplicates:
        table, file, unreadable, together = write_duplicate_table(collection, duplicates, out)
    else:
        (out / "near_duplicates.csv").unlink(missing_ok=True)  # not this split's
    result = split_collection(collection, ratios, seed=seed, together=together)
    splits_path, report_path = write_split(collection, result, out)
    if update_spec:
        import os

        set_spec_splits(spec_path, os.path.relpath(splits_path, spec_path.resolve().parent))
    from medsig.data.inspect import conflict_warnings, label_conflicts

    return SplitRun(result, splits_path, report_path, table, file, duplicates, unreadable,
                    conflict_warnings(label_conflicts(collection)))
