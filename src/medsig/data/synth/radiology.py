"""ROCO-like generated radiology collection: grayscale X-ray / CT renderings with captions.

Chest X-rays show dark lungs in a bright body, ribs, vessels, heart and diaphragm; chest CT
slices show two lungs, heart, aorta and spine; knee X-rays show femur, tibia and fibula.
Findings are drawn where a radiologist would look: an opacity in a lobe (pneumonia), fluid
with a meniscus at a base (effusion), a round nodule, a wide heart (cardiomegaly), a lung
edge with no markings beyond it (pneumothorax), a displaced line across a bone (fracture).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medsig.data.synth._draw import (
    blob,
    mask,
    maybe_missing,
    paint,
    pick,
    png_bytes,
    rng_for,
    smooth_noise,
    write_csv,
)
from medsig.data.synth.radiology_text import caption

KIND = 3
FINDINGS = ("Normal", "Pneumonia", "Effusion", "Nodule", "Cardiomegaly", "Pneumothorax",
            "Fracture")
STUDIES = {  # (modality, body part, view): (probability, finding probabilities)
    ("X-ray", "Chest", "PA"): (0.5, (0.3, 0.2, 0.15, 0.12, 0.13, 0.1, 0)),
    ("X-ray", "Chest", "AP"): (0.2, (0.25, 0.25, 0.2, 0.08, 0.12, 0.1, 0)),
    ("CT", "Chest", "Axial"): (0.18, (0.25, 0.2, 0.2, 0.2, 0.05, 0.1, 0)),
    ("X-ray", "Knee", "AP"): (0.12, (0.4, 0, 0, 0, 0, 0, 0.6)),
}
AGES = ("0-17", "18-39", "40-59", "60-79", "80+")


def _chest_xray(img: np.ndarray, rng: np.random.Generator, f: dict[str, Any], ap: bool
                ) -> None:
    s = img.shape[0]
    u = lambda *v: [x * s for x in v]  # noqa: E731
    body = blob(rng, *u(0.5, 0.62, 0.46, 0.62), 0.04)
    paint(img, mask(s, lambda d: d.polygon(body, fill=255), 0.02 * s), 128 + rng.normal(0, 8))
    top = rng.uniform(0.04, 0.12)
    paint(img, mask(s, lambda d: d.ellipse(u(-0.15, top, 1.15, top + 0.6), fill=255),
                    0.03 * s), 140, 0.85)  # shoulders and upper arms
    lungs = {}
    for side, cx in (("right", 0.32), ("left", 0.68)):
        pts = blob(rng, *u(cx + rng.normal(0, 0.01), 0.47, 0.15, 0.27), 0.06)
        pts = [(x, min(y, s * (0.72 if side == "right" else 0.75))) for x, y in pts]
        lungs[side] = mask(s, lambda d, p=pts: d.polygon(p, fill=255), 0.012 * s)
    lung = np.maximum(lungs["right"], lungs["left"])
    yy = np.linspace(0, 1, s, dtype=np.float32)[:, None]
    paint(img, lung, 60 + 25 * yy + 6 * smooth_noise(rng, s, 8), 0.92)
    spine = mask(s, lambda d: d.rectangle(u(0.46, 0.0, 0.54, 1.0), fill=255), 0.015 * s)
    paint(img, spine, 170, 0.6)
    ctr = rng.uniform(0.38, 0.47) + (0.05 if ap else 0) + (
        rng.uniform(0.16, 0.24) if f["finding"] == "Cardiomegaly" else 0)
    f["ctr"] = round(ctr, 2)
    hw = ctr * 0.72 * s / 2
    heart = blob(rng, 0.53 * s + 0.15 * hw, 0.62 * s, hw, 0.13 * s, 0.05)
    paint(img, mask(s, lambda d: d.polygon(heart, fill=255), 0.015 * s), 168, 0.9)
    ptx = f["finding"] == "Pneumothorax"
    side = f.get("side", "right")
    _markings(img, rng, lungs, ptx, side)
    def ribs(d: ImageDraw.ImageDraw) -> None:
        for sx in (0.32, 0.68):
            for k in range(8):
                y0 = (0.22 + 0.065 * k + rng.normal(0, 0.004)) * s
                d.arc((sx * s - 0.2 * s, y0 - 0.05 * s, sx * s + 0.2 * s, y0 + 0.12 * s),
                      200, 340, fill=255, width=max(1, s // 70))
        for sx in (-1, 1):  # clavicles
            d.line(u(0.5 + sx * 0.05, 0.2, 0.5 + sx * 0.32, 0.14), fill=255,
                   width=max(1, s // 45))

    paint(img, mask(s, ribs, 0.006 * s) * (0.3 + lung), 160, 0.4)
    lm = lungs[side]
    if f["finding"] == "Pneumonia":
        cy = {"upper": 0.32, "middle": 0.48, "lower": 0.6}[f["zone"]]
        cx = 0.32 if side == "right" else 0.68
        pts = blob(rng, *u(cx + rng.normal(0, 0.03), cy, rng.uniform(0.07, 0.11),
                           rng.uniform(0.06, 0.09)), 0.5)
        m = mask(s, lambda d: d.polygon(pts, fill=255), 0.025 * s) * lm
        paint(img, m * np.clip(0.7 + 0.5 * smooth_noise(rng, s, 14), 0, 1), 150, 0.9)
    elif f["finding"] == "Effusion":
        top = (0.72 if side == "right" else 0.75) - f["extent"] * 0.36
        cx = (0.17 if side == "right" else 0.83) * s
        curve = [(x, (top + 0.12 * ((x - cx) / s) ** 2 / 0.04) * s - 0.03 * s)
                 for x in np.linspace(cx - 0.3 * s, cx + 0.3 * s, 12)]
        poly = curve + [(cx + 0.3 * s, s), (cx - 0.3 * s, s)]
        paint(img, mask(s, lambda d: d.polygon(poly, fill=255), 0.012 * s) * lm, 140, 0.95)
    elif f["finding"] == "Nodule":
        cx = (0.3 if side == "right" else 0.7) + rng.normal(0, 0.04)
        cy = rng.uniform(*{"upper": (0.28, 0.4), "middle": (0.42, 0.5),
                           "lower": (0.52, 0.62)}[f["zone"]])
        r = f["size_mm"] / 420 * s
        paint(img, mask(s, lambda d: d.ellipse((cx * s - r, cy * s - r, cx * s + r,
                                                cy * s + r), fill=255), 0.004 * s), 185, 0.9)


def _markings(img: np.ndarray, rng: np.random.Generator, lungs: dict[str, np.ndarray],
              ptx: bool, side: str) -> None:
    """Vessels fanning out of each hilum; with a pneumothorax, the collapsed lung's edge."""
    s = img.shape[0]
    for name, hx in (("right", 0.42), ("left", 0.58)):
        sign = -1 if name == "right" else 1

        def draw(d: ImageDraw.ImageDraw, hx: float = hx, sign: int = sign) -> None:
            for _ in range(10):
                th = rng.uniform(-1.3, 1.3)
                x, y = hx * s, 0.47 * s
                pts = [(x, y)]
                for turn in rng.normal(0, 0.2, 5):
                    th += turn
                    x, y = x + sign * math.cos(th) * 0.04 * s, y + math.sin(th) * 0.05 * s
                    pts.append((x, y))
                d.line(pts[:3], fill=255, width=1)
                d.line(pts[2:], fill=110, width=1)  # vessels taper towards the periphery

        m = mask(s, draw, 0.004 * s) * lungs[name]
        if ptx and name == side:
            edge = (0.27 if name == "right" else 0.73) * s
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            inside = np.clip((xx - edge) * sign / (0.01 * s), 0, 1)  # lateral of the edge
            m = m * (1 - inside)
            paint(img, inside * lungs[name], 22, 0.75)  # no lung, only air
            line = np.exp(-((xx - edge) / (0.006 * s)) ** 2) * lungs[name]
            paint(img, line, 150, 0.7)
        paint(img, m, 150, 0.45)


def _chest_ct(img: np.ndarray, rng: np.random.Generator, f: dict[str, Any]) -> None:
    s = img.shape[0]
    u = lambda *v: [x * s for x in v]  # noqa: E731
    paint(img, mask(s, lambda d: d.ellipse(u(0.07, 0.2, 0.93, 0.84), fill=255), 0.01 * s), 95)
    paint(img, mask(s, lambda d: d.ellipse(u(0.1, 0.23, 0.9, 0.81), fill=255), 0.01 * s), 125)
    paint(img, mask(s, lambda d: d.arc(u(0.05, 0.7, 0.95, 0.95), 20, 160, fill=255,
                                       width=max(1, s // 60))), 170)
    side = f.get("side", "right")
    lungs = {}
    for name, cx in (("right", 0.31), ("left", 0.69)):
        pts = blob(rng, *u(cx, 0.5, 0.16, 0.22), 0.08)
        lungs[name] = mask(s, lambda d, p=pts: d.polygon(p, fill=255), 0.006 * s)
        paint(img, lungs[name], 22 + 6 * smooth_noise(rng, s, 10), 0.97)
        dots = [(rng.uniform(cx - 0.12, cx + 0.12) * s, rng.uniform(0.32, 0.68) * s)
                for _ in range(30)]
        ptx = f["finding"] == "Pneumothorax" and name == side
        m = mask(s, lambda d, q=dots: [d.ellipse((x - 0.6, y - 0.6, x + 0.6, y + 0.6),
                                                 fill=255) for x, y in q]) * lungs[name]
        if ptx:  # anterior air with no vessels, and the lung edge
            yy = np.linspace(0, 1, s, dtype=np.float32)[:, None]
            front = np.clip((0.42 - yy) / 0.02, 0, 1) * lungs[name]
            m = m * (1 - front)
            paint(img, front, 2, 0.95)
            paint(img, np.exp(-((yy - 0.42) / 0.008) ** 2) * lungs[name], 90, 0.7)
        paint(img, m, 120, 0.7)
    hr = (0.17 if f["finding"] != "Cardiomegaly" else rng.uniform(0.24, 0.28)) * s
    f["ctr"] = round(2 * hr / (0.86 * s), 2)
    heart = blob(rng, 0.52 * s, 0.43 * s, hr, hr * 0.8, 0.05)
    paint(img, mask(s, lambda d: d.polygon(heart, fill=255), 0.008 * s), 135)
    paint(img, mask(s, lambda d: d.ellipse(u(0.52, 0.58, 0.6, 0.66), fill=255)), 140)  # aorta
    paint(img, mask(s, lambda d: d.ellipse(u(0.44, 0.64, 0.56, 0.76), fill=255)), 225)  # spine
    lm = lungs[side]
    cx = 0.31 if side == "right" else 0.69
    if f["finding"] == "Pneumonia":
        pts = blob(rng, *u(cx + rng.normal(0, 0.03), rng.uniform(0.5, 0.62), 0.08, 0.06), 0.5)
        m = mask(s, lambda d: d.polygon(pts, fill=255), 0.012 * s) * lm
        paint(img, m * np.clip(0.7 + 0.5 * smooth_noise(rng, s, 16), 0, 1), 115, 0.95)
    elif f["finding"] == "Effusion":
        top = 0.7 - f["extent"] * 0.25
        yy = np.linspace(0, 1, s, dtype=np.float32)[:, None]
        paint(img, np.clip((yy - top) / 0.015, 0, 1) * lm, 100, 0.95)
    elif f["finding"] == "Nodule":
        x, y, r = cx * s + rng.normal(0, 0.05) * s, rng.uniform(0.38, 0.6) * s, \
            f["size_mm"] / 250 * s
        paint(img, mask(s, lambda d: d.ellipse((x - r, y - r, x + r, y + r), fill=255)), 130)


def _knee(img: np.ndarray, rng: np.random.Generator, f: dict[str, Any]) -> None:
    s = img.shape[0]
    u = lambda *v: [x * s for x in v]  # noqa: E731
    paint(img, mask(s, lambda d: d.rectangle(u(0.2, 0, 0.8, 1), fill=255), 0.06 * s), 85)
    bone_top = [*u(0.4, 0.0), *u(0.6, 0.0), *u(0.62, 0.36), *u(0.7, 0.42), *u(0.68, 0.47),
                *u(0.32, 0.47), *u(0.3, 0.42), *u(0.38, 0.36)]
    bone_bot = [*u(0.31, 0.51), *u(0.69, 0.51), *u(0.66, 0.57), *u(0.59, 0.62),
                *u(0.58, 1.0), *u(0.42, 1.0), *u(0.41, 0.62), *u(0.34, 0.57)]
    fib = [*u(0.7, 0.58), *u(0.75, 0.58), *u(0.73, 1.0), *u(0.69, 1.0)]
    frac = f["finding"] == "Fracture"
    fy = rng.uniform(0.68, 0.85) if frac else 1.0
    shift = f.get("shift", 0.0) * s

    def bone(pts: list[float], lo: float, hi: float, dx: float) -> np.ndarray:
        m = mask(s, lambda d: d.polygon(pts, fill=255), 0.006 * s)
        rows = np.zeros((s, 1), np.float32)
        rows[int(lo * s):int(hi * s)] = 1
        m = m * rows
        return np.roll(m, int(round(dx)), axis=1) if dx else m

    parts = [bone(bone_top, 0, 1, 0), bone(bone_bot, 0, fy, 0), bone(fib, 0, 1, 0)]
    if frac:
        parts.append(bone(bone_bot, fy, 1, shift))
    for m in parts:
        paint(img, m, 200, 0.95)
        k = max(1, s // 50)
        inner = np.minimum(np.roll(m, k, axis=1), np.roll(m, -k, axis=1))
        paint(img, inner, 165, 0.8)  # medulla darker than the cortex
    patella = mask(s, lambda d: d.ellipse(u(0.42, 0.33, 0.58, 0.45), fill=255), 0.01 * s)
    paint(img, patella, 215, 0.35)
    if frac:
        pts = [(x, fy * s + rng.normal(0, 0.008 * s)) for x in np.linspace(0.38 * s,
                                                                         0.62 * s, 8)]
        paint(img, mask(s, lambda d: d.line(pts, fill=255, width=max(1, s // 64)),
                        0.003 * s), 60, 0.9)


def render(f: dict[str, Any], rng: np.random.Generator, size: int) -> Image.Image:
    img = np.full((size, size), rng.uniform(5, 25), np.float32)
    if f["body_part"] == "Knee":
        _knee(img, rng, f)
    elif f["modality"] == "CT":
        _chest_ct(img, rng, f)
    else:
        _chest_xray(img, rng, f, ap=f["view"] == "AP")
    gamma = rng.uniform(0.8, 1.25)
    img = 255 * (np.clip(img, 0, 255) / 255) ** gamma
    img = img * rng.uniform(0.85, 1.1) + rng.normal(0, 5)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2, 6)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")
    out = out.rotate(rng.normal(0, 3), resample=Image.Resampling.BILINEAR, fillcolor=0)
    if f["modality"] == "X-ray" and rng.random() < 0.7:  # side marker
        d = ImageDraw.Draw(out)
        d.text((rng.uniform(0.04, 0.12) * size, rng.uniform(0.04, 0.1) * size),
               "R" if rng.random() < 0.7 else "L", fill=230)
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.7)))


def _finding(rng: np.random.Generator, study: tuple[str, str, str]) -> dict[str, Any]:
    finding = pick(rng, FINDINGS, STUDIES[study][1])
    f: dict[str, Any] = {"modality": study[0], "body_part": study[1], "view": study[2],
                         "finding": finding, "side": pick(rng, ("right", "left"), (1, 1))}
    f["zone"] = pick(rng, ("upper", "middle", "lower"), (0.25, 0.25, 0.5))
    f["extent"] = rng.uniform(0.2, 1.0)
    f["size_mm"] = int(rng.integers(8, 28))
    f["shift"] = rng.uniform(0.0, 0.05) * rng.choice([-1, 1])
    return f


def build(out: Path, n: int, seed: int, size: int) -> dict[str, Any]:
    """Write images/ (PNG, mode L) and metadata.csv; return the spec as a dict."""
    rows: list[dict[str, str]] = []
    patient = 0
    studies = list(STUDIES)
    while len(rows) < n:
        prng = rng_for(seed, KIND, 1, patient)
        study = studies[int(prng.choice(len(studies), p=[v[0] for v in STUDIES.values()]))]
        f = _finding(prng, study)
        age = pick(prng, AGES, (0.08, 0.22, 0.3, 0.3, 0.1))
        sex = pick(prng, ("Female", "Male"), (0.48, 0.52))
        for k in range(2 if prng.random() < 0.2 else 1):
            if len(rows) >= n:
                break
            i = len(rows)
            irng = rng_for(seed, KIND, 2, i)
            g = dict(f)
            if k == 1 and g["body_part"] == "Chest" and g["finding"] != "Fracture":
                g["modality"], g["view"] = (("CT", "Axial") if g["modality"] == "X-ray"
                                            else ("X-ray", "PA"))
            img = render(g, irng, size)
            image_id = f"rad{i:05d}"
            (out / "images" / f"{image_id}.png").write_bytes(png_bytes(img))
            rows.append({"image_id": image_id, "image_path": f"{image_id}.png",
                         "patient_id": f"pat{patient:04d}", "modality": g["modality"],
                         "body_part": g["body_part"], "view": g["view"],
                         "sex": maybe_missing(irng, sex, 0.03),
                         "age_group": maybe_missing(irng, age, 0.05), "finding": g["finding"],
                         "caption": maybe_missing(irng, caption(g, irng), 0.03)})
        patient += 1
    write_csv(out / "metadata.csv", rows)
    return {
        "name": "radiology-synth",
        "description": f"Generated ROCO-like radiology images with captions (medsig synth, "
                       f"seed {seed}).",
        "table": "metadata.csv",
        "image_root": "images",
        "columns": {"image": "image_path", "id": "image_id", "text": "caption",
                    "group": "patient_id"},
        "missing_values": ["MISSING", ""],
        "templates": ["A {modality} of the {body_part}: {finding}.",
                      "A {modality} image of the {body_part}."],
        "metadata": ["modality", "body_part", "view", "sex", "age_group"],
        "labels": [
            {"name": "finding", "type": "multiclass", "column": "finding",
             "classes": list(FINDINGS)},
            {"name": "abnormal", "type": "binary", "column": "finding",
             "positive": list(FINDINGS[1:]), "negative": ["Normal"],
             "states": ["normal", "abnormal"]},
        ],
    }
