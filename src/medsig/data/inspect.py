"""`medsig data inspect`: counts, label distributions, MISSING, pos_weight and warnings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medsig.data.collection import SPLITS, Collection
from medsig.data.images import image_problem


@dataclass
class LabelConflict:
    """A group (case / patient) whose rows disagree on a label."""

    label: str
    group: str
    values: dict[str, list[int]]  # readable value -> 1-based table rows with it

    def __str__(self) -> str:
        parts = [f"{v} (row{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:5]))}"
                 f"{' ...' if len(r) > 5 else ''})" for v, r in self.values.items()]
        return f"group '{self.group}': {' vs '.join(parts)}"


def label_conflicts(collection: Collection) -> list[LabelConflict]:
    """Groups whose rows carry different (non-missing) values of one label (vectorised)."""
    out: list[LabelConflict] = []
    rows = collection.rows + 1 if len(collection.rows) == len(collection) \
        else np.arange(1, len(collection) + 1)
    for name, lab in collection.labels.items():
        if lab.parent is not None:  # a coarse label follows its fine label
            continue
        targets = np.asarray(lab.targets)
        _, first, codes = np.unique(targets.reshape(len(targets), -1), axis=0,
                                    return_index=True, return_inverse=True)
        names = [str(lab.readable(int(i))) for i in first]  # one per distinct value
        frame = pd.DataFrame({"g": collection.groups.astype(str), "v": codes.reshape(-1),
                              "r": rows})[~lab.missing]
        n_values = frame.groupby("g", sort=False)["v"].nunique()
        bad = frame[frame["g"].isin(set(n_values.index[n_values > 1]))]
        found: dict[str, dict[str, list[int]]] = {}
        for (group, code), rs in bad.groupby(["g", "v"], sort=False)["r"]:
            found.setdefault(str(group), {})[names[int(code)]] = [int(r) for r in rs]
        out += [LabelConflict(name, g, values) for g, values in found.items()]
    return out


def conflict_warnings(conflicts: list[LabelConflict], shown: int = 3) -> list[str]:
    """One warning per label naming its first conflicting groups, values and rows."""
    by_label: dict[str, list[LabelConflict]] = {}
    for c in conflicts:
        by_label.setdefault(c.label, []).append(c)
    return [f"label '{name}': {len(cs)} group(s) whose rows disagree: "
            + "; ".join(str(c) for c in cs[:shown]) + (" ..." if len(cs) > shown else "")
            for name, cs in by_label.items()]


@dataclass
class LabelSummary:
    name: str
    kind: str
    counts: dict[str, int]  # class -> rows with it (binary: both states)
    groups: dict[str, int]  # class -> distinct groups with it
    missing: int
    pos_weight: dict[str, float] = field(default_factory=dict)


@dataclass
class InspectReport:
    name: str
    rows: int
    groups: int
    images_found: int
    images_missing: list[str]
    labels: list[LabelSummary]
    split_counts: dict[str, int] | None
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "rows": self.rows, "groups": self.groups,
            "images_found": self.images_found, "images_missing": len(self.images_missing),
            "split_counts": self.split_counts, "warnings": self.warnings,
            "labels": [vars(lab) for lab in self.labels],
        }


def inspect_collection(collection: Collection, min_groups: int = 3) -> InspectReport:
    """Summarise a collection; `min_groups`: fewer groups than this cannot be split 3 ways."""
    problems = [(str(p), image_problem(p)) for p in collection.image_paths]
    missing_images = [p for p, why in problems if why is not None]
    warnings: list[str] = []
    why_counts = Counter(why for _, why in problems if why is not None)
    what = {"missing": "missing on disk", "not_a_file": "not regular files (will be skipped)",
            "outside_root": "outside the image root (will be skipped; set "
                            "allow_outside_root: true in the spec to allow)"}
    for why, n in why_counts.items():
        example = next(p for p, w in problems if w == why)
        warnings.append(f"{n} image(s) {what[why]}, e.g. {example}")
    summaries = []
    for name, lab in collection.labels.items():
        onehot = lab.onehot()
        if lab.kind == "binary":
            valid = ~lab.missing
            counts = {lab.classes[0]: int((lab.targets == 0).sum()),
                      lab.classes[1]: int((lab.targets == 1).sum())}
            groups = {lab.classes[0]: _n_groups(collection, lab.targets == 0),
                      lab.classes[1]: _n_groups(collection, lab.targets == 1)}
            pos = counts[lab.classes[1]]
            pos_weight = {lab.classes[1]: float((valid.sum() - pos) / pos) if pos else
                          float("inf")}
        else:
            counts = {c: int(onehot[:, j].sum()) for j, c in enumerate(lab.classes)}
            groups = {c: _n_groups(collection, onehot[:, j] > 0)
                      for j, c in enumerate(lab.classes)}
            pos_weight = {}
            if lab.kind == "multilabel":
                n_valid = int((~lab.missing).sum())
                pos_weight = {c: float((n_valid - n) / n) if n else float("inf")
                              for c, n in counts.items()}
        rare = [c for c, g in groups.items() if g < min_groups]
        if rare:
            warnings.append(f"label '{name}': {len(rare)} class(es) in fewer than {min_groups} "
                            f"groups, too rare to be in every split: {', '.join(rare[:6])}"
                            f"{' ...' if len(rare) > 6 else ''}")
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            warnings.append(f"label '{name}': no rows for {', '.join(empty[:6])}")
        summaries.append(LabelSummary(name, lab.kind, counts, groups, int(lab.missing.sum()),
                                      pos_weight))
    warnings += conflict_warnings(label_conflicts(collection))
    split_counts = None
    if collection.split is not None:
        split_counts = {s: int((collection.split == s).sum()) for s in SPLITS}
        leaked = _leaked_groups(collection)
        if leaked:
            warnings.append(f"{len(leaked)} group(s) appear in more than one split (leakage), "
                            f"e.g. {', '.join(leaked[:3])}")
    return InspectReport(collection.spec.name, len(collection), len(set(collection.groups)),
                         len(collection) - len(missing_images), missing_images, summaries,
                         split_counts, warnings)


def _n_groups(collection: Collection, mask: np.ndarray) -> int:
    return len(set(collection.groups[mask]))


def _leaked_groups(collection: Collection) -> list[str]:
    seen: dict[str, str] = {}
    leaked = set()
    for g, s in zip(collection.groups, collection.split):
        if seen.setdefault(g, s) != s:
            leaked.add(str(g))
    return sorted(leaked)
