"""SurgWound-like generated collection: post-operative incisions with graded findings.

Every label is drawn: erythema as a red halo, edema as a smooth glossy swelling, exudate as
coloured drops along the incision, "Not healing" as an open gap. Infection risk and urgency
follow from them (purulent exudate + erythema -> high risk -> Red), as in clinical notes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageDraw

from medsig.data.synth._draw import (
    FITZPATRICK,
    finish,
    jitter,
    jpeg_bytes,
    lighting,
    mask,
    maybe_missing,
    paint,
    pick,
    rng_for,
    skin,
    skin_tone,
    smooth_noise,
    write_csv,
    write_mask,
)

KIND = 2
RISKS = ("Low", "Medium", "High")
EXUDATES = ("No exudate", "Serous", "Sanguineous", "Purulent")
EXUDATE_COLOR = {"Serous": (238, 226, 186), "Sanguineous": (140, 18, 24),
                 "Purulent": (204, 194, 88)}
# site: (probability, direction (rad), length (fraction of side), curvature)
SITES = {"Abdomen": (0.24, math.pi / 2, 0.7, 0.0), "Cesarean": (0.16, 0.0, 0.62, 0.16),
         "Knee": (0.16, math.pi / 2, 0.58, 0.03), "Hip": (0.1, math.pi / 4, 0.55, 0.1),
         "Chest": (0.1, math.pi / 2, 0.8, 0.0), "Spine": (0.1, math.pi / 2, 0.6, 0.0),
         "Shoulder": (0.07, -math.pi / 4, 0.4, 0.05), "Ankle": (0.07, 0.3, 0.36, 0.08)}
CLOSURES = ("Sutures", "Staples", "Glue", "Removed")
AGES = ("18-39", "40-59", "60-74", "75+")
TEMPLATES = ["A surgical wound on the {body_site}, {healing}, with {erythema} and {edema}.",
             "A surgical wound on the {body_site}, {healing}, with {erythema}.",
             "A photo of a post-operative wound on the {body_site}."]


def _labels(rng: np.random.Generator) -> dict[str, str]:
    """Correlated findings: a latent infection risk drives every visible sign."""
    risk = pick(rng, RISKS, (0.5, 0.3, 0.2))
    r = RISKS.index(risk)
    exudate = pick(rng, EXUDATES, ((0.6, 0.3, 0.1, 0.0), (0.3, 0.4, 0.15, 0.15),
                                   (0.05, 0.15, 0.1, 0.7))[r])
    erythema = rng.random() < (0.2, 0.6, 0.9)[r]
    edema = rng.random() < (0.15, 0.45, 0.75)[r]
    healing = rng.random() < (0.85, 0.55, 0.2)[r]
    urgency = pick(rng, ("Green", "Yellow", "Red"),
                   ((0.85, 0.15, 0.0), (0.2, 0.65, 0.15), (0.0, 0.3, 0.7))[r])
    if exudate == "Purulent" and erythema and risk == "High":
        urgency = "Red"
    return {"healing_status": "Healing" if healing else "Not healing",
            "erythema": "Present" if erythema else "Absent",
            "edema": "Present" if edema else "Absent",
            "infection_risk": risk, "urgency_level": urgency, "exudate_type": exudate}


def _path(rng: np.random.Generator, site: str, size: int) -> list[tuple[float, float]]:
    """Points along the incision for a body site, with camera rotation and offset."""
    _, direction, length, curve = SITES[site]
    th = direction + rng.normal(0, 0.25) + (math.pi if rng.random() < 0.5 else 0)
    ln = length * size * rng.uniform(0.85, 1.15)
    k = curve + rng.normal(0, 0.03)
    cx, cy = size * (0.5 + rng.normal(0, 0.05, 2))
    d, nrm = (math.cos(th), math.sin(th)), (-math.sin(th), math.cos(th))
    pts = []
    for t in np.linspace(-1, 1, 25):
        bend = k * ln * (1 - t * t)
        pts.append((cx + t * ln / 2 * d[0] + bend * nrm[0], cy + t * ln / 2 * d[1]
                    + bend * nrm[1]))
    return pts


def _band(p: np.ndarray, nrm: np.ndarray, width: float):
    """A drawer for a band of `width` px along the path, with round ends (one polygon)."""
    h = max(0.5, width / 2)
    poly = [tuple(x) for x in p + nrm * h] + [tuple(x) for x in (p - nrm * h)[::-1]]

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.polygon(poly, fill=255)
        for x, y in (p[0], p[-1]):
            d.ellipse((x - h, y - h, x + h, y + h), fill=255)

    return draw


def _normals(pts: list[tuple[float, float]]) -> np.ndarray:
    p = np.asarray(pts)
    tang = np.gradient(p, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-9
    return np.stack([-tang[:, 1], tang[:, 0]], axis=1)


def render(lab: dict[str, str], site: str, fitz: str, closure: str,
           rng: np.random.Generator, size: int):
    tone = skin_tone(rng, fitz)
    img = skin(rng, size, tone, mottling=6.0)
    pts = _path(rng, site, size)
    p, nrm = np.asarray(pts), _normals(pts)
    s = size / 128
    line = lambda w: _band(p, nrm, w)  # noqa: E731
    if lab["edema"] == "Present":  # smooth, lighter, glossy swelling
        m = mask(size, line(size * rng.uniform(0.3, 0.45)), size * 0.08)
        rim = mask(size, line(size * rng.uniform(0.5, 0.6)), size * 0.06) - m
        paint(img, np.clip(rim, 0, 1), tone * 0.8, 0.5)  # shadow around the raised area
        paint(img, m, tone * 1.16 + np.array([14, 4, 4]), rng.uniform(0.55, 0.8))
        off = nrm[len(pts) // 2] * size * 0.07
        gloss = [(x + off[0], y + off[1]) for x, y in pts[4:-4]]
        paint(img, mask(size, lambda d: d.line(gloss, fill=255, width=max(1, int(5 * s))),
                        3 * s), (255, 250, 245), rng.uniform(0.3, 0.5))
    red = np.array([208, 46, 44], np.float32) * 0.75 + tone * 0.25
    if lab["erythema"] == "Present":
        m = mask(size, line(size * rng.uniform(0.12, 0.22)), size * rng.uniform(0.04, 0.07))
        m *= np.clip(0.75 + 0.4 * smooth_noise(rng, size, 4), 0, 1)
        paint(img, m, red, rng.uniform(0.5, 0.75))
    else:
        paint(img, mask(size, line(size * 0.04), size * 0.02), red, rng.uniform(0.0, 0.12))
    scar = tone * 0.72 + np.array([30, 0, 0], np.float32)
    paint(img, mask(size, line(max(1.0, 1.6 * s)), 0.4 * s), scar, rng.uniform(0.55, 0.85))
    if lab["healing_status"] == "Not healing":  # open gap along part of the incision
        n = len(pts)
        a = int(rng.integers(0, n // 3))
        b = int(min(n - 1, a + rng.integers(n // 3, n)))
        wmax = size * rng.uniform(0.03, 0.06)
        prof = np.sin(np.linspace(0, math.pi, b - a + 1)) * wmax + 0.5
        seg, nn = p[a:b + 1], nrm[a:b + 1]
        poly = [tuple(x) for x in seg + nn * prof[:, None]] + \
            [tuple(x) for x in (seg - nn * prof[:, None])[::-1]]
        m = mask(size, lambda d: d.polygon(poly, fill=255), 0.6 * s)
        paint(img, m, jitter(rng, (118, 24, 30), 8), 0.95)
        tex = smooth_noise(rng, size, 16)[..., None] * np.array([40, 12, 12], np.float32)
        paint(img, m * 0.5, np.clip(img + tex, 0, 255), 1.0)
        if rng.random() < 0.5:
            paint(img, m * (smooth_noise(rng, size, 12) > 0.35), (214, 194, 128), 0.7)
    _closure(img, rng, closure, p, nrm, size)
    if lab["exudate_type"] in EXUDATE_COLOR:
        _exudate(img, rng, lab["exudate_type"], p, size)
    if rng.random() < 0.2:  # drape / gauze at one edge
        c = ((70, 120, 160), (60, 130, 110), (236, 236, 232))[int(rng.integers(3))]
        w = size * rng.uniform(0.08, 0.2)
        edge = int(rng.integers(4))
        box = [(0, 0, w, size), (0, 0, size, w), (size - w, 0, size, size),
               (0, size - w, size, size)][edge]
        paint(img, mask(size, lambda d: d.rectangle(box, fill=255), 1.0), jitter(rng, c, 8))
    light = lighting(rng, size, 0.2, 0.15)
    out = finish(img, rng, light, noise=rng.uniform(1.5, 4.0), blur=rng.uniform(0, 0.8))
    return out, mask(size, line(size * 0.22)) > 0.5  # the wound region (findings drawn there)


def _closure(img: np.ndarray, rng: np.random.Generator, closure: str, p: np.ndarray,
             nrm: np.ndarray, size: int) -> None:
    s = size / 128
    if closure in ("Removed", "MISSING"):
        return
    if closure == "Glue":
        m = mask(size, lambda d: d.line([tuple(x) for x in p], fill=255, width=int(5 * s) + 1),
                 1.5 * s)
        paint(img, m, (250, 245, 235), 0.25)
        return
    staples = closure == "Staples"
    step = 2 if staples else 3
    half = size * (0.035 if staples else 0.025)
    color = (186, 188, 198) if staples else (30, 32, 62)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for i in range(1, len(p) - 1, step):
            a, b = p[i] - nrm[i] * half, p[i] + nrm[i] * half
            d.line([tuple(a), tuple(b)], fill=255, width=max(1, int((2.2 if staples else 1.2)
                                                                    * s)))

    paint(img, mask(size, draw, 0.3 * s), color, 0.95)


def _exudate(img: np.ndarray, rng: np.random.Generator, kind: str, p: np.ndarray,
             size: int) -> None:
    count = int(rng.integers(2, 7))
    idx = rng.integers(2, len(p) - 2, count)
    blobs = [(p[i] + rng.normal(0, size * 0.01, 2), size * rng.uniform(0.018, 0.045))
             for i in idx]

    def draw(d: ImageDraw.ImageDraw, f: float = 1.0, dx: float = 0.0) -> None:
        for (x, y), r in blobs:
            rr = r * f
            d.ellipse((x + dx * r - rr, y + dx * r - rr * 0.8, x + dx * r + rr,
                       y + dx * r + rr * 0.8), fill=255)

    alpha = {"Serous": 0.55, "Sanguineous": 0.9, "Purulent": 0.9}[kind]
    paint(img, mask(size, draw, size * 0.006), jitter(rng, EXUDATE_COLOR[kind], 8), alpha)
    paint(img, mask(size, lambda d: draw(d, 0.3, -0.35), size * 0.004), (255, 255, 255),
          0.5 if kind == "Serous" else 0.25)


def _description(lab: dict[str, str], site: str, closure: str, day: int,
                 rng: np.random.Generator) -> str:
    parts = [f"POD {day}, {site.lower()} incision"
             + (f" closed with {closure.lower()}" if closure in ("Sutures", "Staples") else "")]
    phrases = {
        "erythema": {"Present": "surrounding erythema", "Absent": "no erythema"},
        "edema": {"Present": "swelling of the wound edges", "Absent": "no swelling"},
        "exudate_type": {"No exudate": "dry", "Serous": "serous drainage",
                         "Sanguineous": "bloody drainage", "Purulent": "purulent discharge"},
        "healing_status": {"Healing": "edges well approximated",
                           "Not healing": "wound edges separated"},
    }
    for col, words in phrases.items():
        if lab[col] in words and rng.random() < 0.8:
            parts.append(words[lab[col]])
    return "; ".join(parts) + "."


def build(out: Path, n: int, seed: int, size: int) -> dict[str, Any]:
    """Write images/ and metadata.csv; return the spec as a dict."""
    rows: list[dict[str, str]] = []
    patient = 0
    missing = {"healing_status": 0.05, "erythema": 0.05, "edema": 0.25,
               "infection_risk": 0.05, "urgency_level": 0.05, "exudate_type": 0.1}
    while len(rows) < n:
        prng = rng_for(seed, KIND, 1, patient)
        site = pick(prng, list(SITES), [v[0] for v in SITES.values()])
        fitz = pick(prng, FITZPATRICK, (0.12, 0.25, 0.25, 0.18, 0.12, 0.08))
        base = {"patient_id": f"pt{patient:04d}",
                "age_group": maybe_missing(prng, pick(prng, AGES, (0.25, 0.35, 0.25, 0.15)),
                                           0.03),
                "sex": maybe_missing(prng, pick(prng, ("Female", "Male"),
                                                (0.9, 0.1) if site == "Cesarean"
                                                else (0.5, 0.5)), 0.03),
                "fitzpatrick": fitz, "body_site": site}
        lab = _labels(prng)
        closure = pick(prng, CLOSURES, (0.45, 0.3, 0.1, 0.15))
        day = int(prng.integers(2, 31))
        for _ in range(2 if prng.random() < 0.15 else 1):
            if len(rows) >= n:
                break
            i = len(rows)
            irng = rng_for(seed, KIND, 2, i)
            img, region = render(lab, site, fitz, closure, irng, size)
            image_id = f"wound{i:05d}"
            write_mask(out / "masks" / f"{image_id}.png", region)
            (out / "images" / f"{image_id}.jpg").write_bytes(
                jpeg_bytes(img, int(irng.integers(60, 96))))
            row = {"image_id": image_id, "image_path": f"{image_id}.jpg", **base,
                   "days_post_op": str(day), "closure": maybe_missing(irng, closure, 0.05)}
            row.update({k: maybe_missing(irng, v, missing[k]) for k, v in lab.items()})
            row["description"] = maybe_missing(irng, _description(row, site, closure, day,
                                                                   irng), 0.1)
            rows.append(row)
        patient += 1
    write_csv(out / "metadata.csv", rows)
    binary = lambda name, col, pos, neg, states: {  # noqa: E731
        "name": name, "type": "binary", "column": col, "positive": pos, "negative": neg,
        "states": states}
    return {
        "name": "wound-synth",
        "description": f"Generated SurgWound-like post-operative wounds (medsig synth, seed "
                       f"{seed}).",
        "table": "metadata.csv",
        "image_root": "images",
        "columns": {"image": "image_path", "id": "image_id", "text": "description",
                    "group": "patient_id"},
        "missing_values": ["MISSING", ""],
        "templates": TEMPLATES,
        "metadata": ["body_site", "closure", "fitzpatrick", "age_group", "sex",
                     "days_post_op"],
        "labels": [
            binary("healing", "healing_status", ["Not healing"], ["Healing"],
                   ["healing", "not healing"]),
            binary("erythema", "erythema", ["Present"], ["Absent"],
                   ["no erythema", "erythema"]),
            binary("edema", "edema", ["Present"], ["Absent"], ["no edema", "edema"]),
            binary("urgency", "urgency_level", ["Yellow", "Red"], ["Green"],
                   ["home care", "needs attention"]),
            {"name": "infection_risk", "type": "multiclass", "column": "infection_risk",
             "classes": list(RISKS)},
            {"name": "exudate", "type": "multiclass", "column": "exudate_type",
             "classes": list(EXUDATES)},
        ],
    }
