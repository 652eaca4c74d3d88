"""Per-row texts: the description column when present, else a template."""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

_FORMATTER = string.Formatter()


def template_fields(template: str) -> list[str]:
    """Names used by a template, e.g. ['condition', 'description']."""
    return [name for _, name, _, _ in _FORMATTER.parse(template) if name]


def render_text(
    text: str | None,
    templates: Sequence[str],
    lookup: Callable[[str], str | None],
    rng: random.Random | None = None,
    fallback: str = "A medical image.",
) -> str:
    """The row's text: `text` when non-empty, else a template whose fields are all present.

    Without an rng the first usable template is taken (deterministic); with one, a random
    usable template (augmentation: a different phrasing each epoch).
    """
    if text:
        return text
    usable = []
    for template in templates:
        values = {name: lookup(name) for name in template_fields(template)}
        if all(v not in (None, "") for v in values.values()):
            usable.append(template.format(**values))
    if not usable:
        return fallback
    return rng.choice(usable) if rng is not None else usable[0]
