"""Per-label results for /v1/predict and the plain-text findings summary.

Decisions come from ``medsig.models.heads`` (the same ``Head`` training wrote); this module
only turns them into the API schema and into text that states each finding unambiguously:
the probability shown is always named after the state it is the probability of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medsig.models.heads import Head, decide
from medsig.serve.schemas import HeadInfo, LabelResult

SAME_IMAGE_COSINE = 0.9995  # an image hit this close is flagged as the query itself
NOT_RECORDED = "not recorded"
MAX_LISTED = 5  # multilabel findings named in the summary; the rest are counted

CAVEAT = ("Note: automated image analysis for decision support only; this is not a "
          "diagnosis and must be reviewed by a clinician.")


def head_info(h: Head) -> HeadInfo:
    """A head as /v1/labels describes it."""
    return HeadInfo(name=h.name, kind=h.kind, classes=h.states,  # type: ignore[arg-type]
                    thresholds=list(h.thresholds), threshold_rule=h.threshold_rule)


def label_results(heads: Sequence[Any], probs: np.ndarray) -> list[LabelResult]:
    """The /v1/predict labels of one image's probability row (all heads concatenated)."""
    return [LabelResult.model_validate(d.to_dict()) for d in decide(heads, probs)]


def summarize(labels: Sequence[LabelResult], model_name: str, version: str) -> str:
    """A short plain-text block of findings, ready to paste into an LLM prompt."""
    lines = [f"Automated image findings (model {model_name}, version {version}):"]
    for lab in labels:
        lines.append(f"- {lab.name}: {finding(lab)}")
    lines.append(CAVEAT)
    return "\n".join(lines)


def _p(name: str, p: float) -> str:
    return f"P({name}) = {p:.2f}"


def finding(lab: LabelResult) -> str:
    """One finding: the decided state, then the probability of a named state."""
    if lab.state == "uncertain":  # conformal set of several states (medsig.serve.safe)
        if lab.kind == "multilabel":
            unsure = ", ".join(lab.uncertain_classes or [])
            return f"uncertain — needs review (unsure about: {unsure})"
        plausible = " or ".join(lab.conformal_set or []) or "none of the states"
        return (f"uncertain — needs review (plausible: {plausible}; "
                f"{_p(lab.probability_of, lab.probability)})")
    if lab.kind == "binary":
        side = "at or above" if lab.present else "below"
        return (f"{lab.decision} ({_p(lab.probability_of, lab.probability)}, {side} the "
                f"threshold {lab.threshold:.2f})")
    if lab.kind == "multiclass":
        others = sorted((s for s in lab.scores if not s.positive), key=lambda s: -s.probability)
        rest = ", ".join(_p(s.name, s.probability) for s in others[:2])
        return f"{lab.decision} ({_p(lab.decision, lab.probability)}" + \
            (f"; {rest})" if rest else ")")
    found = sorted((s for s in lab.scores if s.positive), key=lambda s: -s.probability)
    if not found:
        top = max(lab.scores, key=lambda s: s.probability, default=None)
        return "none above its threshold" + (
            f" (highest {_p(top.name, top.probability)}, below the threshold "
            f"{top.threshold:.2f})" if top is not None and top.threshold is not None else "")
    shown = ", ".join(f"{s.name} ({_p(s.name, s.probability)}, threshold {s.threshold:.2f})"
                      for s in found[:MAX_LISTED])
    more = len(found) - MAX_LISTED
    return shown + (f"; {more} more above threshold (see the scores)" if more > 0 else "")


def case_labels(labels: dict[str, Any] | None) -> dict[str, Any]:
    """A similar case's readable labels: missing ones shown as ``not recorded``, an empty
    multilabel as ``none`` (never silently dropped)."""
    out: dict[str, Any] = {}
    for name, value in (labels or {}).items():
        if value is None:
            out[name] = NOT_RECORDED
        elif isinstance(value, list) and not value:
            out[name] = "none"
        else:
            out[name] = value
    return out


def same_image(score: float, image_query: bool) -> bool:
    return image_query and float(score) >= SAME_IMAGE_COSINE
