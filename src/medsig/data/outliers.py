"""Images a medical model should refuse: noise, blank and near-blank frames, screenshots of
text. Used to measure the OOD gate (evaluation report, ``bench/ood.py``). Deterministic for
a seed."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("noise", "blank", "near_blank", "text")
_WORDS = ("invoice total amount due date account balance meeting agenda notes project "
          "report summary please confirm the schedule attached document page version "
          "login password settings update download share message reply").split()


def outlier_images(kind: str, n: int, size: int = 128, seed: int = 0) -> list[Image.Image]:
    """``n`` RGB images of one outlier kind (see ``KINDS``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown outlier kind {kind!r} (choose from {', '.join(KINDS)})")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    return [_make(kind, size, rng) for _ in range(n)]


def _make(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    if kind == "noise":
        if rng.random() < 0.5:
            arr = rng.integers(0, 256, (size, size, 3))
        else:  # smooth noise: low-resolution noise upsampled
            small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
            return Image.fromarray(small).resize((size, size), Image.BILINEAR)
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "blank":
        return Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    if kind == "near_blank":
        base = rng.integers(0, 256, 3)
        arr = base + rng.normal(0, 3, (size, size, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _text(size, rng)


def _text(size: int, rng: np.random.Generator) -> Image.Image:
    """A screenshot-like page: light background, dark lines of words, maybe a title bar."""
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y = 2
    if rng.random() < 0.5:
        bar = tuple(int(v) for v in rng.integers(40, 160, 3))
        d.rectangle([0, 0, size, max(6, size // 10)], fill=bar)
        y = max(6, size // 10) + 3
    while y < size - 8:
        words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 7))))
        d.text((3, y), words, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=font)
        y += 11
    return img
