"""Per-label decisions from a probability row, and the plain-text findings summary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medsig.models import heads
from medsig.serve.schemas import ClassScore, HeadInfo, LabelResult

MAX_LISTED = 5  # multilabel findings named in the summary; the rest are counted

CAVEAT = ("Note: automated image analysis for decision support only; this is not a "
          "diagnosis and must be reviewed by a clinician.")


class Head(heads.Head):
    """A head as served: ``medsig.models.heads.Head`` with its /v1/labels description."""

    def info(self) -> HeadInfo:
        return HeadInfo(name=self.name, kind=self.kind, classes=self.classes,  # type: ignore
                        thresholds=self.thresholds, threshold_rule=self.threshold_rule)


def heads_of(heads: Iterable[Any]) -> list[Head]:
    return [h if isinstance(h, Head) else Head.of(h) for h in heads]


def decide(heads: Sequence[Head], probs: np.ndarray) -> list[LabelResult]:
    """Decisions for one image: `probs` is its row of probabilities (all heads concatenated)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    return [_decide_head(h, probs[h.offset:h.offset + h.size]) for h in heads]


def _decide_head(h: Head, p: np.ndarray) -> LabelResult:
    p = [round(float(x), 6) for x in p]
    if h.kind == "binary":
        neg, pos = (h.classes + ["absent", "present"][len(h.classes):])[:2]
        t = h.thresholds[0]
        yes = p[0] >= t
        return LabelResult(name=h.name, kind="binary", classes=[neg, pos], probability=p[0],
                           threshold=t, decision=pos if yes else neg,
                           present=[pos] if yes else [],
                           scores=[ClassScore(name=pos, probability=p[0], threshold=t,
                                              positive=yes)])
    if h.kind == "multiclass":
        best = int(np.argmax(p))
        scores = [ClassScore(name=c, probability=x, threshold=None, positive=i == best)
                  for i, (c, x) in enumerate(zip(h.classes, p))]
        return LabelResult(name=h.name, kind="multiclass", classes=h.classes,
                           probability=p[best], threshold=None, decision=h.classes[best],
                           present=[h.classes[best]], scores=scores)
    scores = [ClassScore(name=c, probability=x, threshold=t, positive=x >= t)
              for c, x, t in zip(h.classes, p, h.thresholds)]
    present = [s.name for s in sorted(scores, key=lambda s: -s.probability) if s.positive]
    return LabelResult(name=h.name, kind="multilabel", classes=h.classes,
                       probability=max(p) if p else 0.0, threshold=None,
                       decision=", ".join(present) if present else "none", present=present,
                       scores=scores)


def summarize(labels: Sequence[LabelResult], model_name: str, version: str) -> str:
    """A short plain-text block of findings, ready to paste into an LLM prompt."""
    lines = [f"Automated image findings (model {model_name}, version {version}):"]
    for lab in labels:
        lines.append(f"- {lab.name}: {_finding(lab)}")
    lines.append(CAVEAT)
    return "\n".join(lines)


def _finding(lab: LabelResult) -> str:
    if lab.state == "uncertain":  # conformal set of several states (medsig.serve.safe)
        plausible = ", ".join(lab.uncertain_classes if lab.kind == "multilabel"
                              else lab.conformal_set or []) or "none"
        return (f"uncertain — needs review (plausible: {plausible}; "
                f"p={lab.probability:.2f})")
    if lab.kind == "binary":
        return f"{lab.decision} (p={lab.probability:.2f}, threshold {lab.threshold:.2f})"
    if lab.kind == "multiclass":
        others = sorted((s for s in lab.scores if not s.positive), key=lambda s: -s.probability)
        rest = ", ".join(f"{s.name} {s.probability:.2f}" for s in others[:2])
        return f"{lab.decision} (p={lab.probability:.2f}" + (f"; {rest})" if rest else ")")
    found = [s for s in lab.scores if s.positive]
    if not found:
        top = max(lab.scores, key=lambda s: s.probability, default=None)
        return "none above threshold" + (
            f" (highest {top.name} p={top.probability:.2f}, threshold {top.threshold:.2f})"
            if top else "")
    found.sort(key=lambda s: -s.probability)
    shown = ", ".join(f"{s.name} (p={s.probability:.2f}, threshold {s.threshold:.2f})"
                      for s in found[:MAX_LISTED])
    more = len(found) - MAX_LISTED
    return shown + (f"; {more} more above threshold (see the scores)" if more > 0 else "")
