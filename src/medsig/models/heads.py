"""One output head of a classifier, probe or zero-shot model, and its decisions.

A model's outputs concatenate its heads: head ``h`` owns columns ``h.offset ..
h.offset + h.size``; binary heads have 1 output (P(positive state)), multiclass and
multilabel one per class. ``Head.probabilities`` turns the head's logits into probabilities
(sigmoid for binary / multilabel, softmax over a multiclass slice) and ``Head.decide`` turns
its probabilities into a ``Decision`` at the saved thresholds. Training builds heads from a
collection's labels (``heads_for``); the model folder (``medsig.models.artifact``) stores
them; prediction, evaluation and serving read them back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_STATES = ["absent", "present"]


@dataclass(frozen=True)
class Score:
    """The probability of one named state / class, and whether it is decided."""

    name: str
    probability: float
    threshold: float | None
    positive: bool


@dataclass(frozen=True)
class Decision:
    """One head's decision for one image (the /v1/predict ``LabelResult``)."""

    name: str
    kind: str
    classes: list[str]
    decision: str
    probability: float
    probability_of: str  # the state / class `probability` is the probability of
    threshold: float | None
    present: list[str]
    scores: list[Score]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Head:
    name: str
    kind: str  # binary | multiclass | multilabel
    classes: list[str]  # binary: [negative state, positive state]
    offset: int
    size: int
    thresholds: list[float] = field(default_factory=list)  # per output; none for multiclass
    threshold_rule: str | None = None

    @property
    def outputs(self) -> list[str]:
        """Readable name of each output ('<label>:<class>')."""
        names = [self.states[1]] if self.kind == "binary" else self.classes
        return [f"{self.name}:{c}" for c in names]

    @property
    def states(self) -> list[str]:
        """Binary: [negative state, positive state] (absent / present by default)."""
        return (list(self.classes) + DEFAULT_STATES[len(self.classes):])[:2] \
            if self.kind == "binary" else list(self.classes)

    @property
    def cols(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def with_thresholds(self, thresholds: Sequence[float], rule: str | None) -> Head:
        return Head(self.name, self.kind, list(self.classes), self.offset, self.size,
                    [float(t) for t in thresholds], rule)

    def to_dict(self) -> dict[str, Any]:
        """The medsig.json entry."""
        return {"name": self.name, "kind": self.kind, "classes": list(self.classes),
                "offset": self.offset, "size": self.size,
                "thresholds": list(self.thresholds), "threshold_rule": self.threshold_rule}

    @classmethod
    def of(cls, head: Any) -> Head:
        """From a medsig.json dict or any object with the same attributes; binary and
        multilabel heads without thresholds get 0.5."""
        if isinstance(head, Head):
            return head
        get = head.get if isinstance(head, dict) else lambda k, d=None: getattr(head, k, d)
        classes = [str(c) for c in get("classes") or []]
        kind = str(get("kind"))
        size = int(get("size") if get("size") is not None else
                   (1 if kind == "binary" else len(classes)))
        thresholds = [float(t) for t in get("thresholds") or []]
        if kind != "multiclass" and not thresholds:
            thresholds = [0.5] * size
        return cls(str(get("name")), kind, classes, int(get("offset") or 0), size, thresholds,
                   get("threshold_rule"))

    def onehot(self, targets: np.ndarray) -> np.ndarray:
        """(n, size) float32 0/1 targets per output, -1 where missing, from the label's
        encoded targets (binary (n,) in 1/0/-1, multiclass (n,) index or -1, multilabel
        (n, C))."""
        t = np.asarray(targets)
        if self.kind == "binary":
            return t.astype(np.float32).reshape(-1, 1)
        if self.kind == "multilabel":
            return t.astype(np.float32)
        out = np.zeros((len(t), self.size), np.float32)
        ok = t >= 0
        out[np.nonzero(ok)[0], t[ok].astype(np.int64)] = 1
        out[~ok] = -1
        return out

    # -- probabilities and decisions --------------------------------------------------------
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, size) probabilities from this head's (n, size) logits."""
        logits = logits.float()
        return torch.softmax(logits, dim=-1) if self.kind == "multiclass" \
            else torch.sigmoid(logits)

    def decide(self, p: Sequence[float] | np.ndarray) -> Decision:
        """The decision for this head's probabilities of one image."""
        p = [round(float(x), 6) for x in np.asarray(p, dtype=np.float64).reshape(-1)]
        if self.kind == "binary":
            neg, pos = self.states
            t = self.thresholds[0] if self.thresholds else 0.5
            yes = p[0] >= t
            return Decision(self.name, "binary", [neg, pos], pos if yes else neg, p[0], pos, t,
                            [pos] if yes else [], [Score(pos, p[0], t, yes)])
        if self.kind == "multiclass":
            best = int(np.argmax(p))
            scores = [Score(c, x, None, i == best) for i, (c, x) in enumerate(zip(self.classes, p))]
            return Decision(self.name, "multiclass", list(self.classes), self.classes[best],
                            p[best], self.classes[best], None, [self.classes[best]], scores)
        ts = list(self.thresholds) or [0.5] * self.size
        scores = [Score(c, x, t, x >= t) for c, x, t in zip(self.classes, p, ts)]
        ranked = sorted(scores, key=lambda s: -s.probability)
        present = [s.name for s in ranked if s.positive]
        top = ranked[0] if ranked else Score("", 0.0, None, False)
        return Decision(self.name, "multilabel", list(self.classes),
                        ", ".join(present) if present else "none", top.probability, top.name,
                        None, present, scores)


def heads_of(heads: Iterable[Any]) -> list[Head]:
    """``Head`` objects from heads, medsig.json dicts or anything with the same attributes."""
    return [Head.of(h) for h in heads]


def total_outputs(heads: Iterable[Head]) -> int:
    return sum(h.size for h in heads)


def head_probabilities(logits: torch.Tensor, heads: Sequence[Any]) -> torch.Tensor:
    """(n, K) probabilities of every head from the (n, K) concatenated logits."""
    probs = torch.empty_like(logits, dtype=torch.float32)
    for h in heads_of(heads):
        probs[:, h.cols] = h.probabilities(logits[:, h.cols])
    return probs


def decide(heads: Sequence[Any], probs: Sequence[float] | np.ndarray) -> list[Decision]:
    """Decisions for one image: ``probs`` is its row of probabilities (heads concatenated)."""
    row = np.asarray(probs, dtype=np.float64).reshape(-1)
    return [h.decide(row[h.cols]) for h in heads_of(heads)]


def heads_for(labels: Iterable[Any]) -> list[Head]:
    """Heads (no thresholds yet) for encoded labels (``EncodedLabel``: name, kind, classes),
    laid out one after another."""
    out, offset = [], 0
    for lab in labels:
        size = 1 if lab.kind == "binary" else len(lab.classes)
        out.append(Head(lab.name, lab.kind, list(lab.classes), offset, size))
        offset += size
    return out
