"""Drawing helpers shared by the generators: masks, blobs, noise, lighting, skin, saving.

Images are float32 arrays (H, W, 3) in 0..255 while drawing; shapes are drawn into PIL "L"
masks (fast at small sizes), optionally blurred, then blended into the image with numpy.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

Color = Sequence[float] | float
Point = tuple[float, float]

# Fitzpatrick skin types I..VI: approximate sRGB of unaffected skin.
FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")
SKIN_TONES = {"I": (240, 212, 194), "II": (226, 188, 158), "III": (204, 158, 122),
              "IV": (168, 120, 86), "V": (118, 80, 56), "VI": (78, 53, 38)}


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent, reproducible generator for (seed, keys...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32, shape (size, size)."""
    ax = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    return yy, xx


def mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None], blur: float = 0.0
         ) -> np.ndarray:
    """Draw with `draw(d)` (fill 255) on a black L canvas; return float32 in [0, 1]."""
    m = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(m))
    return np.asarray(soften(m, blur), dtype=np.float32) * (1.0 / 255.0)


def soften(img: Image.Image, blur: float) -> Image.Image:
    """A Gaussian-like blur; wider ones go through a down- and up-scale (2x faster)."""
    if blur <= 0.6:  # below that, the final image blur does the job
        return img
    if blur < 1.5:
        return img.filter(ImageFilter.GaussianBlur(blur))
    w, h = img.size
    f = min(max(2, round(blur / 1.4)), max(1, min(w, h) // 4))
    return img.reduce(f).resize((w, h), Image.Resampling.BICUBIC)


def paint(img: np.ndarray, m: np.ndarray, color: Color | np.ndarray, alpha: float = 1.0
          ) -> None:
    """Blend `color` into img where m > 0, in place.

    img is (H, W, 3) with an RGB colour or (H, W) with a gray value; `color` may also be an
    array shaped like img.
    """
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if len(rows) == 0 or alpha <= 0:
        return
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    color = np.asarray(color, dtype=np.float32)
    if color.ndim >= 2:
        color = color[box]
    a = m[box] * np.float32(alpha)
    if img.ndim == 3:
        a = a[..., None]
    img[box] += (color - img[box]) * a


def jitter(rng: np.random.Generator, color: Color, sd: float = 8.0) -> np.ndarray:
    out = np.asarray(color, dtype=np.float32) + rng.normal(0, sd, 3)
    return np.clip(out, 0, 255).astype(np.float32)


def blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
         irregularity: float = 0.2, angle: float = 0.0, n: int = 20) -> list[Point]:
    """A closed polygon: an ellipse whose radius wobbles with a few random harmonics."""
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    wobble = np.zeros(n)
    if irregularity > 0:
        for k in range(2, 6):
            wobble += rng.normal(0, 1) / k * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        wobble += 0.25 * rng.normal(0, 1, n) * irregularity
    r = np.clip(1 + irregularity * wobble, 0.35, 1.8)
    x, y = rx * r * np.cos(theta), ry * r * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + ca * a - sa * b, cy + sa * a + ca * b) for a, b in zip(x, y)]


def scaled(points: Sequence[Point], cx: float, cy: float, f: float) -> list[Point]:
    return [(cx + (x - cx) * f, cy + (y - cy) * f) for x, y in points]


def smooth_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], shape (size, size)."""
    small = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) * 0.6


def lighting(rng: np.random.Generator, size: int, strength: float = 0.2,
             vignette: float = 0.15) -> np.ndarray:
    """A multiplicative field: a linear gradient in a random direction plus a vignette."""
    yy, xx = grid(size)
    t = rng.uniform(0, 2 * math.pi)
    g = rng.uniform(0, strength)
    lin = ((xx * math.cos(t) + yy * math.sin(t)) / size - 0.5 * (math.cos(t) + math.sin(t)))
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.5 * size * size)
    out = (1 + 2 * g * lin) * (1 - rng.uniform(0, vignette) * r2) * rng.uniform(0.85, 1.1)
    return out.astype(np.float32, copy=False)


def skin(rng: np.random.Generator, size: int, tone: Color, mottling: float = 7.0
         ) -> np.ndarray:
    """A skin background: base tone, low-frequency mottling and fine pore noise."""
    low = smooth_noise(rng, size, int(rng.integers(4, 9))) * np.float32(mottling)
    low += rng.standard_normal((size, size), dtype=np.float32) * np.float32(2.5)
    img = np.empty((size, size, 3), np.float32)
    img[:] = low[..., None]
    img += np.asarray(tone, dtype=np.float32)
    img[..., 0] += np.abs(smooth_noise(rng, size, 5)) * np.float32(5)  # uneven redness
    return img


def skin_tone(rng: np.random.Generator, fitzpatrick: str) -> np.ndarray:
    """A plausible skin colour for a Fitzpatrick type: brightness and hue vary, not RGB."""
    base = np.asarray(SKIN_TONES[fitzpatrick], dtype=np.float32) * rng.uniform(0.92, 1.08)
    shift = np.array([1.0, -0.4, -0.8], np.float32) * rng.normal(0, 4)  # redder / yellower
    return np.clip(base + shift + rng.normal(0, 2, 3), 0, 255).astype(np.float32)


def hairs(img: np.ndarray, rng: np.random.Generator, count: int, color: Color) -> None:
    """Thin, slightly curved dark hairs."""
    size = img.shape[0]

    def draw(d: ImageDraw.ImageDraw) -> None:
        for _ in range(count):
            x, y = rng.uniform(0, size, 2)
            t = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.08, 0.25) * size
            pts = []
            for s in np.linspace(0, 1, 5):
                t += rng.normal(0, 0.15)
                pts.append((x + math.cos(t) * length * s, y + math.sin(t) * length * s))
            d.line(pts, fill=255, width=1)

    paint(img, mask(size, draw), color, rng.uniform(0.35, 0.7))


def finish(img: np.ndarray, rng: np.random.Generator, light: np.ndarray | None = None,
           noise: float = 3.0, blur: float = 0.0, balance: float = 0.02) -> Image.Image:
    """Lighting, white balance, sensor noise, clipping, optional blur -> RGB PIL image."""
    img = img * (1 + rng.normal(0, balance, 3)).astype(np.float32)
    if light is not None:
        img *= light[..., None]
    img += rng.standard_normal(img.shape[:2] + (1,), dtype=np.float32) * np.float32(noise)
    np.clip(img, 0, 255, out=img)
    out = Image.fromarray(img.astype(np.uint8), mode="RGB")
    if blur > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return out


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Anchor:
    """Where a lesion sits in one image: centre, unit radius (px) and rotation.

    Lesion geometry is drawn in lesion units (u, v), so several photos of one case show the
    same lesion at another position, zoom and angle.
    """

    cx: float
    cy: float
    r: float
    rot: float = 0.0

    def pt(self, u: float, v: float) -> Point:
        c, s = math.cos(self.rot), math.sin(self.rot)
        return (self.cx + self.r * (c * u - s * v), self.cy + self.r * (s * u + c * v))

    def pts(self, uv: Sequence[Point]) -> list[Point]:
        return [self.pt(u, v) for u, v in uv]


def pick(rng: np.random.Generator, options: Sequence[str], p: Sequence[float]) -> str:
    w = np.asarray(p, dtype=float)
    return str(options[int(rng.choice(len(options), p=w / w.sum()))])


def maybe_missing(rng: np.random.Generator, value: str, rate: float) -> str:
    return "MISSING" if rng.random() < rate else value


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as CSV (every value a string; "MISSING" kept literally)."""
    pd.DataFrame(rows).to_csv(path, index=False, lineterminator="\n")


def write_mask(path: Path, region: np.ndarray) -> None:
    """A boolean (size, size) region as a 1-bit PNG (the finding's mask, for saliency
    checks); the folder is made on first use."""
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.asarray(region, dtype=bool)).save(path, optimize=True)
