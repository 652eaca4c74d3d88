"""SCIN-like generated dermatology collection: cases of 1-3 photos, weighted differentials."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medsig.data.synth._draw import (
    FITZPATRICK,
    Anchor,
    finish,
    hairs,
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
    write_csv,
)
from medsig.data.synth.derm_conditions import (
    COARSE_SITES,
    CONDITIONS,
    SITES,
    condition_map,
    visible_layers,
)
from medsig.data.synth.derm_draw import PRIMITIVES, Ctx

KIND = 1
FITZ_P = (0.10, 0.28, 0.27, 0.18, 0.11, 0.06)
AGES = ("18-29", "30-39", "40-49", "50-59", "60-69", "70+")
OLDER = {"Pigmented lesion", "Skin cancer", "Ulcer", "Blistering disease"}
DURATIONS = ("1 day", "less than 1 week", "1-4 weeks", "1-3 months", "more than 3 months")
CLOTH = ((70, 90, 140), (40, 40, 45), (200, 200, 205), (120, 60, 60), (90, 120, 90))
TEMPLATES = [
    # the row's text where it has no description: every label in one caption
    "A dermatological image showing {condition}, {category}, {urgent}.",
    # one label each: the zero-shot prompts of the condition, the category and the referral
    "A dermatological image showing {condition}.",
    "A dermatological image showing {category}.",
    "A dermatological image showing {urgent}.",
    "Clinical presentation of {condition}: {description}",
    "A close-up photo of the {body_site} with {condition}.",
]


def _cases(n: int, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Dominant condition and image count per case; every condition gets >= 3 cases if n
    allows, the rest follow the long-tailed weights."""
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.20])))
    counts[-1] -= sum(counts) - n
    names = list(CONDITIONS)
    base = min(3, len(counts) // len(names))
    w = np.array([CONDITIONS[c].weight for c in names])
    rest = rng.choice(len(names), size=len(counts) - base * len(names), p=w / w.sum())
    dominant = [c for c in names for _ in range(base)] + [names[i] for i in rest]
    order = rng.permutation(len(dominant))
    return [dominant[i] for i in order], counts


def _differential(dom: str, rng: np.random.Generator) -> dict[str, float]:
    """1-3 conditions with weights summing to 1, the first (dominant) the largest."""
    k = int(rng.choice([0, 1, 2], p=[0.6, 0.28, 0.12]))
    names = list(CONDITIONS)
    same = [c for c in names if CONDITIONS[c].coarse == CONDITIONS[dom].coarse and c != dom]
    chosen = [dom]
    while len(chosen) < k + 1:
        pool = same if (same and rng.random() < 0.6) else names
        c = pool[int(rng.integers(len(pool)))]
        if c not in chosen:
            chosen.append(c)
    if k == 0:
        return {dom: 1.0}
    w0 = rng.uniform(0.5, 0.85)
    rest = rng.dirichlet(np.ones(k)) * (1 - w0)
    weights = {c: round(float(x), 2) for c, x in zip(chosen[1:], rest)}
    return {dom: round(1 - sum(weights.values()), 2), **weights}


def _case_meta(case: int, dom: str, rng: np.random.Generator) -> dict[str, Any]:
    cond = CONDITIONS[dom]
    diff = _differential(dom, rng)
    sites = cond.sites or COARSE_SITES.get(cond.coarse, SITES)
    site = sites[int(rng.integers(len(sites)))] if rng.random() < 0.85 else \
        SITES[int(rng.integers(len(SITES)))]
    age_p = np.array([0.22, 0.2, 0.18, 0.16, 0.13, 0.11])
    fitz = pick(rng, FITZPATRICK, FITZ_P)
    itch = "Yes" if rng.random() < cond.itch else "No"
    duration = pick(rng, DURATIONS, (1, 3, 4, 3, 3) if cond.coarse != "Pigmented lesion"
                    else (0.2, 0.5, 1, 2, 6))
    desc = f"{cond.look[0].upper()}{cond.look[1:]} on my {site.lower()} for {duration}."
    if itch == "Yes":
        desc += " " + ("It itches a lot." if cond.itch > 0.8 else "It is itchy.")
    return {
        "case_id": f"case{case:04d}",
        "all_conditions": json.dumps(list(diff)),
        "weighted_labels": json.dumps(diff),
        "fitzpatrick": maybe_missing(rng, fitz, 0.04),
        "age_group": maybe_missing(rng, pick(rng, AGES, age_p[::-1] if cond.coarse in OLDER
                                             else age_p), 0.03),
        "sex": maybe_missing(rng, pick(rng, ("Female", "Male"), (0.6, 0.4)), 0.02),
        "body_site": site,
        "duration": maybe_missing(rng, duration, 0.08),
        "itching": maybe_missing(rng, itch, 0.1),
        "description": maybe_missing(rng, desc, 0.3),
        "dermatologist_confidence": str(int(rng.integers(3, 6) if len(diff) == 1
                                            else rng.integers(1, 5))),
        "urgent_referral": "Urgent" if cond.urgent else "Routine",
        "_fitz": fitz,
    }


def render(dom: str, fitz: str, site: str, case_rng_seed: tuple[int, ...],
           irng: np.random.Generator, size: int, gradable: bool = True):
    """One photo of a case: skin, the dominant condition's lesion, photographic nuisance."""
    crng = rng_for(*case_rng_seed)
    tone = skin_tone(crng, fitz)
    img = skin(irng, size, tone)
    if site not in ("Face", "Hand", "Foot") and irng.random() < 0.35:
        hairs(img, irng, int(irng.integers(3, 12)), tone * 0.35)
    a = Anchor(*(irng.uniform(0.32, 0.68, 2) * size), r=0.23 * size * irng.uniform(0.85, 1.15),
               rot=irng.uniform(0, 2 * math.pi))
    ctx = Ctx(img, a, tone, crng, irng)
    for prim, params in visible_layers(dom):
        PRIMITIVES[prim](ctx, **params)
    if irng.random() < 0.1:  # clothing / background in one corner
        c = CLOTH[int(irng.integers(len(CLOTH)))]
        corner = irng.integers(0, 2, 2) * size
        d = irng.uniform(0.15, 0.35) * size
        tri = [(corner[0], corner[1]), (abs(corner[0] - 2 * d), corner[1]),
               (corner[0], abs(corner[1] - 2 * d))]
        paint(img, mask(size, lambda dr: dr.polygon(tri, fill=255), 1.0), jitter(irng, c, 10))
    light = lighting(irng, size, 0.25, 0.2)
    blur = irng.uniform(0, 0.7) if gradable else irng.uniform(2.0, 3.5)
    if not gradable:
        light = light * 0.6
    return finish(img, irng, light, noise=irng.uniform(1.5, 4.0), blur=blur)


def build(out: Path, n: int, seed: int, size: int) -> dict[str, Any]:
    """Write images/, metadata.csv and condition_map.json; return the spec as a dict."""
    rng = rng_for(seed, KIND, 0)
    dominant, counts = _cases(n, rng)
    rows = []
    for case, (dom, k) in enumerate(zip(dominant, counts)):
        meta = _case_meta(case, dom, rng_for(seed, KIND, 1, case))
        fitz = meta.pop("_fitz")
        for _ in range(k):
            i = len(rows)
            irng = rng_for(seed, KIND, 2, i)
            gradable = irng.random() > 0.04
            img = render(dom, fitz, meta["body_site"], (seed, KIND, 3, case), irng, size,
                         gradable)
            image_id = f"derm{i:05d}"
            (out / "images" / f"{image_id}.jpg").write_bytes(
                jpeg_bytes(img, int(irng.integers(60, 96))))
            rows.append({"image_id": image_id, "image_path": f"{image_id}.jpg",
                         **meta, "gradable": "Yes" if gradable else "No"})
    write_csv(out / "metadata.csv", rows)
    (out / "condition_map.json").write_text(json.dumps(condition_map(), indent=1) + "\n")
    return {
        "name": "derm-synth",
        "description": f"Generated SCIN-like dermatology photos (medsig synth, seed {seed}).",
        "table": "metadata.csv",
        "image_root": "images",
        "columns": {"image": "image_path", "id": "image_id", "group": "case_id"},
        "missing_values": ["MISSING", ""],
        "templates": TEMPLATES,
        "metadata": ["fitzpatrick", "age_group", "sex", "body_site", "duration", "itching",
                     "dermatologist_confidence", "gradable"],
        "labels": [
            {"name": "condition", "type": "multilabel", "column": "all_conditions",
             "weights_column": "weighted_labels", "classes": sorted(CONDITIONS),
             "coarse": {"name": "category", "map": "condition_map.json",
                        "exclude": ["Other"]}},
            {"name": "urgent", "type": "binary", "column": "urgent_referral",
             "positive": ["Urgent"], "negative": ["Routine"],
             "states": ["routine", "urgent referral"]},
        ],
    }
