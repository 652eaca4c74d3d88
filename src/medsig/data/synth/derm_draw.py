"""Lesion primitives for the generated dermatology images (see derm_conditions.py).

Geometry and colours come from the case generator (`crng`), so every photo of a case shows
the same lesion; fine texture (scale flakes) comes from the image generator (`irng`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ImageDraw

from medsig.data.synth._draw import Anchor, blob, grid, jitter, mask, paint, scaled

FIELD_RADIUS = 2.6  # lesion units: "field" layouts cover most of the image


@dataclass
class Ctx:
    img: np.ndarray
    a: Anchor
    skin: np.ndarray  # the case's base skin colour
    crng: np.random.Generator
    irng: np.random.Generator
    last: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.img.shape[0]

    def color(self, spec: Any, mix: float = 0.2) -> np.ndarray:
        """A jittered layer colour; lesion colours take a little of the skin tone."""
        if spec[0] == "skin":  # ("skin", factor, delta): relative to the skin tone
            _, f, delta = spec
            return np.clip(self.skin * f + np.asarray(delta, np.float32)
                           + self.crng.normal(0, 4, 3), 0, 255)
        if spec[0] == "mix":  # ("mix", skin share, rgb)
            _, w, rgb = spec
            return w * self.skin + (1 - w) * jitter(self.crng, rgb, 5)
        return (1 - mix) * jitter(self.crng, spec, 7) + mix * self.skin


def centres(ctx: Ctx, count: int, spread: float = 0.6, layout: str = "cluster",
            offset: float = 0.0) -> list[tuple[float, float]]:
    """Lesion-unit centres of `count` elements laid out around the anchor."""
    r = ctx.crng
    out = []
    if layout == "band":
        t = r.uniform(-2.8, 2.8, count)
        return [(float(u), float(v)) for u, v in zip(t, r.normal(0, 0.3, count) + 0.1 * t**2)]
    for _ in range(count):
        if layout == "field":
            rad, th = FIELD_RADIUS * math.sqrt(r.uniform()), r.uniform(0, 2 * math.pi)
        elif layout == "arc":
            rad, th = 1.4 + r.normal(0, 0.12), r.uniform(0.15 * math.pi, 0.85 * math.pi)
        elif layout == "ring":
            rad, th = 1.0 + r.normal(0, 0.06), r.uniform(0, 2 * math.pi)
        else:
            rad = offset + abs(r.normal(0, spread)) if (count > 1 or offset) else 0.0
            th = r.uniform(0, 2 * math.pi)
        out.append((rad * math.cos(th), rad * math.sin(th)))
    return out


def patch(ctx: Ctx, color: Any, size: float = 1.0, count: int = 1, spread: float = 0.6,
          irr: float = 0.3, soft: float = 0.15, alpha: float = 0.85,
          aspect: tuple[float, float] = (0.7, 1.0), offset: float = 0.0,
          aligned: bool = False, layout: str = "cluster") -> None:
    c, r, a = ctx.color(color), ctx.crng, ctx.a
    base_angle = r.uniform(0, 2 * math.pi)
    polys = []
    for u, v in centres(ctx, count, spread, layout, offset):
        rx = size * r.uniform(0.8, 1.2)
        ang = base_angle + (r.normal(0, 0.1) if aligned else r.uniform(0, 2 * math.pi))
        polys.append(a.pts(blob(r, u, v, rx, rx * r.uniform(*aspect), irr, ang)))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for p in polys:
            d.polygon(p, fill=255)

    ctx.last = mask(ctx.size, draw, soft * a.r)
    paint(ctx.img, ctx.last, c, alpha)


def ring(ctx: Ctx, color: Any, size: float = 1.0, count: int = 1, spread: float = 0.6,
         width: float = 0.25, irr: float = 0.2, soft: float = 0.1, alpha: float = 0.9,
         fill: Any = None, layout: str = "cluster") -> None:
    c, r, a = ctx.color(color), ctx.crng, ctx.a
    fc = ctx.color(fill) if fill is not None else None
    rings = []
    for u, v in centres(ctx, count, spread, layout):
        rx = size * r.uniform(0.8, 1.2)
        outer = blob(r, u, v, rx, rx * r.uniform(0.75, 1.0), irr, r.uniform(0, 2 * math.pi))
        rings.append((a.pts(outer), a.pts(scaled(outer, u, v, 1 - width))))
    if fc is not None:
        filled = mask(ctx.size, lambda d: [d.polygon(o, fill=255) for o, _ in rings],
                      soft * a.r)
        paint(ctx.img, filled, fc, 0.85)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for o, i in rings:
            d.polygon(o, fill=255)
            d.polygon(i, fill=0)

    ctx.last = mask(ctx.size, draw, soft * a.r)
    paint(ctx.img, ctx.last, c, alpha)


def dots(ctx: Ctx, color: Any, count: int = 10, radius: float = 0.1, spread: float = 0.6,
         layout: str = "cluster", soft: float = 0.05, alpha: float = 0.9,
         highlight: float = 0.0, head: Any = None, head_size: float = 0.45,
         sides: int = 0) -> None:
    c, r, a = ctx.color(color), ctx.crng, ctx.a
    hc = ctx.color(head, mix=0.1) if head is not None else None
    spots = []
    for u, v in centres(ctx, count, spread, layout):
        x, y = a.pt(u, v)
        spots.append((x, y, max(0.8, radius * r.uniform(0.7, 1.3) * a.r), r.uniform(0, 360)))

    def draw(d: ImageDraw.ImageDraw, f: float = 1.0, dx: float = 0.0) -> None:
        for x, y, rad, rot in spots:
            rr = max(0.6, rad * f)
            if sides >= 3 and f == 1.0:
                d.regular_polygon((x, y, rr), sides, rotation=rot, fill=255)
            else:
                d.ellipse((x + dx * rad - rr, y + dx * rad - rr, x + dx * rad + rr,
                           y + dx * rad + rr), fill=255)

    ctx.last = mask(ctx.size, draw, soft * a.r)
    paint(ctx.img, ctx.last, c, alpha)
    if hc is not None:
        paint(ctx.img, mask(ctx.size, lambda d: draw(d, head_size)), hc, 0.9)
    if highlight > 0:
        paint(ctx.img, mask(ctx.size, lambda d: draw(d, 0.3, -0.35), 0.4), (255, 255, 255),
              highlight)


def dome(ctx: Ctx, color: Any, size: float = 0.5, count: int = 1, spread: float = 0.6,
         highlight: float = 0.4, soft: float = 0.1, irr: float = 0.1,
         alpha: float = 0.95) -> None:
    """Raised round lesions: a body, a specular highlight up-left and a shadow down-right."""
    c, r, a = ctx.color(color), ctx.crng, ctx.a
    yy, xx = grid(ctx.size)
    for u, v in centres(ctx, count, spread):
        rx = size * r.uniform(0.8, 1.2)
        poly = a.pts(blob(r, u, v, rx, rx * r.uniform(0.8, 1.0), irr, r.uniform(0, 6.3)))
        m = mask(ctx.size, lambda d, p=poly: d.polygon(p, fill=255), soft * a.r + 0.5)
        paint(ctx.img, m, c, alpha)
        x, y = a.pt(u, v)
        s2 = 2 * (0.45 * rx * a.r) ** 2
        hi = np.exp(-((xx - x + 0.35 * rx * a.r) ** 2 + (yy - y + 0.35 * rx * a.r) ** 2) / s2)
        lo = np.exp(-((xx - x - 0.5 * rx * a.r) ** 2 + (yy - y - 0.5 * rx * a.r) ** 2) / s2)
        paint(ctx.img, m * hi, (255, 255, 255), highlight)
        paint(ctx.img, m * lo, c * 0.55, 0.5)
        ctx.last = m if ctx.last is None or count == 1 else np.maximum(ctx.last, m)


def scale(ctx: Ctx, color: Any, alpha: float = 0.6, density: float = 1.0,
          dot: float = 1.0) -> None:
    """Flakes / crust / rough texture scattered inside the previous layer's area."""
    if ctx.last is None:
        return
    region = ctx.last > 0.5
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return
    c = ctx.color(color, mix=0.05)
    rad = dot * ctx.size / 128
    n = int(density * len(xs) / (math.pi * max(rad, 0.7) ** 2) * 0.2) + 1
    pick = ctx.irng.integers(0, len(xs), n)
    px = xs[pick] + ctx.irng.uniform(-0.5, 0.5, n)
    py = ys[pick] + ctx.irng.uniform(-0.5, 0.5, n)
    rr = rad * ctx.irng.uniform(0.5, 1.4, n)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for x, y, q in zip(px, py, rr):
            d.ellipse((x - q, y - q * 0.7, x + q, y + q * 0.7), fill=255)

    paint(ctx.img, mask(ctx.size, draw, 0.35 * ctx.size / 128), c, alpha)


def lines(ctx: Ctx, color: Any, count: int = 6, length: float = 0.6, alpha: float = 0.7,
          layout: str = "cluster", spread: float = 1.0) -> None:
    """Thin wiggly lines: vessels, cracks, striae of Wickham."""
    c, r, a = ctx.color(color, mix=0.1), ctx.crng, ctx.a
    paths = []
    for k in range(count):
        if layout == "radial":
            th = 2 * math.pi * k / count + r.normal(0, 0.3)
            u, v = 0.1 * math.cos(th), 0.1 * math.sin(th)
        elif layout == "field":
            rad, th = FIELD_RADIUS * math.sqrt(r.uniform()), r.uniform(0, 2 * math.pi)
            u, v = rad * math.cos(th), rad * math.sin(th)
            th = r.uniform(0, 2 * math.pi)
        else:
            u, v = r.normal(0, spread, 2)
            th = r.uniform(0, 2 * math.pi)
        pts, step = [(u, v)], length * r.uniform(0.7, 1.3) / 4
        for _ in range(4):
            th += r.normal(0, 0.35)
            u, v = u + step * math.cos(th), v + step * math.sin(th)
            pts.append((u, v))
        paths.append(a.pts(pts))
    w = max(1, round(ctx.size / 128))
    paint(ctx.img, mask(ctx.size, lambda d: [d.line(p, fill=255, width=w) for p in paths]),
          c, alpha)


def streak(ctx: Ctx, color: Any, count: int = 1, length: float = 2.0, width: float = 0.2,
           highlight: float = 0.2, parallel: bool = False, alpha: float = 0.9) -> None:
    """Elongated raised bands (scars) or thin parallel lines (striae)."""
    c, r, a = ctx.color(color), ctx.crng, ctx.a
    th0, bend = r.uniform(0, math.pi), r.normal(0, 0.15)
    paths = []
    for k in range(count):
        th = th0 + (r.normal(0, 0.05) if parallel else r.normal(0, 0.5) * (k > 0))
        off = (k - (count - 1) / 2) * (0.3 if parallel else 0.8)
        ln = length * r.uniform(0.8, 1.2)
        pts = []
        for t in np.linspace(-0.5, 0.5, 9):
            u = t * ln * math.cos(th) - off * math.sin(th) - bend * (t * ln) ** 2 * math.sin(th)
            v = t * ln * math.sin(th) + off * math.cos(th) + bend * (t * ln) ** 2 * math.cos(th)
            pts.append((u, v))
        paths.append(a.pts(pts))
    w = max(1, round(width * a.r))
    m = mask(ctx.size, lambda d: [d.line(p, fill=255, width=w, joint="curve") for p in paths],
             0.1 * a.r)
    paint(ctx.img, m, c, alpha)
    if highlight > 0:
        hw = max(1, w // 3)
        paint(ctx.img, mask(ctx.size, lambda d: [d.line(p, fill=255, width=hw)
                                                 for p in paths], 0.05 * a.r),
              (255, 255, 255), highlight)
    ctx.last = m


PRIMITIVES = {"patch": patch, "ring": ring, "dots": dots, "dome": dome, "scale": scale,
              "lines": lines, "streak": streak}
