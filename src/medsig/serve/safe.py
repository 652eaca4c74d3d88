"""Safe outputs in serving: calibrated probabilities (already in the predictor), conformal
states per label, the OOD gate and saliency maps (``explain=true``).

The predict batcher runs ``outputs_fn``: one row per image = the head probabilities and,
last, the ``OOD_COLUMNS`` OOD values (the gate's score and each channel's raw score; NaN
where absent), so the encoder runs once for probes and zero-shot. The image-statistics
channel reads the same pixels (normalisation undone, ``medsig.data.image_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medsig.models.ood import EMBEDDING, IMAGE_STATS, NOT_ASSESSED, pixel_scores
from medsig.serve.schemas import HeadInfo, LabelResult, OodChannel, OodInfo, OodResult
from medsig.serve.summary import head_info

UNCERTAIN = "uncertain — needs review"
CHANNELS = (EMBEDDING, IMAGE_STATS)
OOD_COLUMNS = 1 + len(CHANNELS)  # the gate's score, then each channel's raw score


def _ood_values(gate: Any, predictor: Any, pixels: Any, emb: Any, n: int) -> np.ndarray:
    """(n, OOD_COLUMNS): the gate's score and the raw channel scores (NaN: absent)."""
    out = np.full((n, OOD_COLUMNS), np.nan, np.float32)
    if gate is None:
        return out
    raw = pixel_scores(gate, predictor, pixels, emb)
    out[:, 0] = gate.combined(raw)
    for i, name in enumerate(CHANNELS, 1):
        if name in raw:
            out[:, i] = raw[name]
    return out


def split_row(row: Any) -> tuple[np.ndarray, np.ndarray]:
    """One ``outputs_fn`` row -> (head probabilities, OOD values)."""
    row = np.asarray(row)
    return row[:-OOD_COLUMNS], row[-OOD_COLUMNS:]


def outputs_fn(predictor: Any) -> Callable[[Any], np.ndarray]:
    """pixels -> (n, K + OOD_COLUMNS): calibrated probabilities and the OOD values."""
    safety = getattr(predictor, "safety", None)
    gate = getattr(safety, "ood", None)

    def run(pixels: Any) -> np.ndarray:
        emb = None
        if getattr(predictor, "uses_embeddings", False):
            emb = predictor.embed(pixels)
            probs = predictor.predict_embeddings(emb)
        else:
            probs = predictor.predict_pixels(pixels)
        ood = _ood_values(gate, predictor, pixels, emb, len(probs))
        return np.concatenate([np.asarray(probs, np.float32), ood], axis=1)

    return run


def ood_result(predictor: Any, values: Any, blank: bool = False) -> OodResult | None:
    """The gate's verdict from one image's OOD values (``split_row``; a bare score for a
    one-channel gate); a blank image (``models.ood.is_blank``) is always refused."""
    gate = getattr(getattr(predictor, "safety", None), "ood", None)
    values = np.atleast_1d(np.asarray(values, np.float64))
    score = float(values[0])
    if gate is None or not np.isfinite(score):
        return None
    channels = None
    raw = {c: np.array([values[i]]) for i, c in enumerate(CHANNELS, 1)
           if i < len(values) and np.isfinite(values[i])}
    if gate.needs_stats and len(raw) == len(gate.channels):
        log_p = gate.log_p(raw)
        channels = {c: OodChannel(score=round(float(raw[c][0]), 6),
                                  p_value=float(f"{np.exp(log_p[c][0]):.6g}")) for c in raw}
    return OodResult(score=round(score, 6), threshold=round(float(gate.threshold), 6),
                     flagged=blank or bool(gate.flag(np.array([score]))[0]), blank=blank,
                     channels=channels)


def with_sets(predictor: Any, heads: Sequence[Any], results: list[LabelResult],
              probs: np.ndarray) -> list[LabelResult]:
    """Each label's conformal set and state (unchanged without conformal data)."""
    safety = getattr(predictor, "safety", None)
    if safety is None or not safety.conformal:
        return results
    out = []
    for h, r in zip(heads, results):
        sets = safety.sets(h, probs)
        if sets is None:
            out.append(r)
            continue
        alpha = float(safety.conformal[h.name]["alpha"])
        if h.kind == "multilabel":
            unsure = [c for c, s in zip(h.classes, sets) if len(s) != 1]
            present = [c for c, s in zip(h.classes, sets) if s == ["present"]]
            out.append(r.model_copy(update={
                "conformal_set": present, "uncertain_classes": unsure, "alpha": alpha,
                "state": "uncertain" if unsure else "confident"}))
        else:
            out.append(r.model_copy(update={
                "conformal_set": sets[0], "alpha": alpha,
                "state": "confident" if len(sets[0]) == 1 else "uncertain"}))
    return out


def status_of(results: Sequence[LabelResult], ood: OodResult | None) -> str:
    if ood is not None and ood.flagged:
        return "not_assessed"
    return "uncertain" if any(r.state == "uncertain" for r in results) else "assessed"


def not_assessed_summary(model_name: str, version: str, ood: OodResult) -> str:
    from medsig.serve.summary import CAVEAT

    if ood.score > ood.threshold:
        why = f"out-of-distribution score {ood.score:.3f} above the threshold {ood.threshold:.3f}"
        if ood.channels:
            least = min(ood.channels, key=lambda c: ood.channels[c].p_value)  # type: ignore
            why += f"; most unusual: {least.replace('_', ' ')}"
    else:
        why = "a blank or uniform image"
    return "\n".join([
        f"Automated image findings (model {model_name}, version {version}):",
        f"- {NOT_ASSESSED} ({why}); no findings are given.", CAVEAT])


def head_infos(predictor: Any, heads: Sequence[Any]) -> list[HeadInfo]:
    """/v1/labels entries with calibration parameters and conformal thresholds."""
    safety = getattr(predictor, "safety", None)
    out = []
    for h in heads:
        info = head_info(h)
        if safety is not None:
            conf = safety.conformal.get(h.name) or {}
            info = info.model_copy(update={
                "calibration": safety.calibration.get(h.name),
                "alpha": conf.get("alpha"), "conformal_qhat": conf.get("qhat")})
        out.append(info)
    return out


def ood_info(predictor: Any) -> OodInfo | None:
    gate = getattr(getattr(predictor, "safety", None), "ood", None)
    if gate is None:
        return None
    i = gate.info()
    return OodInfo(method=i["method"], threshold=i["threshold"],
                   false_reject_target=i["false_reject_target"], n_reference=i["n_reference"],
                   channels=i["channels"], combine=i["combine"])


def explain(predictor: Any, heads: Sequence[Any], pixels: Any, results: list[LabelResult],
            probs: np.ndarray, method: str | None = None) -> list[LabelResult]:
    """Each label with a saliency overlay of its score (``medsig.models.saliency``; runs in
    the model thread)."""
    from medsig.models.saliency import (
        DEFAULT_METHOD,
        overlay_png,
        resolve_method,
        saliency_map,
        target_column,
    )

    method = resolve_method(predictor, method or DEFAULT_METHOD)
    out = []
    for h, r in zip(heads, results):
        cam = saliency_map(predictor, pixels, target_column(h, probs), method)
        out.append(r if cam is None else r.model_copy(update={
            "saliency_png": overlay_png(pixels, cam, predictor.preprocess),
            "saliency_method": method}))
    return out
