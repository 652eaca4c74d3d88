"""One output head of a classifier or probe, as written in ``medsig.json``.

A model's outputs concatenate its heads: head ``h`` owns columns ``h.offset ..
h.offset + h.size``; binary heads have 1 output, multiclass and multilabel one per class.
Training builds heads from a collection's labels; serving reads them back with ``Head.of``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Head:
    name: str
    kind: str  # binary | multiclass | multilabel
    classes: list[str]
    offset: int
    size: int
    thresholds: list[float] = field(default_factory=list)  # per output; none for multiclass
    threshold_rule: str | None = None

    @property
    def outputs(self) -> list[str]:
        """Readable name of each output ('<label>:<class>')."""
        names = [self.classes[1]] if self.kind == "binary" else self.classes
        return [f"{self.name}:{c}" for c in names]

    @property
    def cols(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def to_dict(self) -> dict[str, Any]:
        """The medsig.json entry without thresholds (added once they are chosen)."""
        return {"name": self.name, "kind": self.kind, "classes": self.classes,
                "offset": self.offset, "size": self.size}

    @classmethod
    def of(cls, head: Any) -> Head:
        """From a medsig.json dict or any object with the same attributes; binary and
        multilabel heads without thresholds get 0.5."""
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
