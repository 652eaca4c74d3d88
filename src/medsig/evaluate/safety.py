"""The safe outputs of a model on the evaluation split: calibration before / after the
saved calibration (ECE, Brier, reliability bins), empirical conformal coverage against
1 - alpha with the abstention rate, and the OOD gate (false-reject rate on the split, AUROC
against generated images of kinds it must refuse, per channel too). Plus the report section
that shows them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsig.data.collection import Collection
from medsig.evaluate.clinical import display_name
from medsig.metrics.classification import calibration, roc_auc
from medsig.models.conformal import coverage
from medsig.models.heads import Head

OUTLIERS_PER_KIND = 50


def outlier_scores(predictor: Any, n: int = OUTLIERS_PER_KIND
                   ) -> dict[str, dict[str, list[float]]]:
    """Raw OOD channel scores of generated noise / blank / near-blank / text images: kind ->
    channel -> scores."""
    from medsig.data.outliers import KINDS, outlier_images
    from medsig.data.patches import stack_pixels
    from medsig.models.ood import pixel_scores

    gate = predictor.safety.ood
    size = max(int(predictor.image_size or 64), 64)
    out = {}
    for kind in KINDS:
        px = stack_pixels([predictor.preprocess(im) for im in outlier_images(kind, n, size)])
        out[kind] = {c: [round(float(s), 6) for s in v]
                     for c, v in pixel_scores(gate, predictor, px).items()}
    return out


def split_stats(predictor: Any, col: Collection, rows: np.ndarray, batch_size: int = 64,
                num_workers: int | None = None) -> np.ndarray:
    """Image statistics of the split's ``rows`` (NaN rows where unreadable), read as the
    predictor reads them: the OOD gate's second channel."""
    from medsig.data.image_stats import DIM, collection_stats

    stats, kept = collection_stats(col.image_paths, rows.tolist(), predictor.preprocess,
                                   batch_size, num_workers, draft_size=predictor.image_size)
    out = np.full((len(col), DIM), np.nan, np.float32)
    out[kept] = stats
    return out[rows]


def _calibration_pair(h: Head, y: np.ndarray, raw: np.ndarray, cal: np.ndarray
                      ) -> dict[str, Any]:
    if h.kind == "multilabel":  # every class as a binary output, pooled
        y, raw, cal = y.reshape(-1), raw.reshape(-1), cal.reshape(-1)
    elif h.kind == "binary":
        raw, cal = raw[:, 0], cal[:, 0]
    return {"before": calibration(y, raw), "after": calibration(y, cal)}


def safe_outputs(col: Collection, out: Any, path: str) -> dict[str, Any] | None:
    """Metrics of the folder's safe outputs on ``col`` (the rows of ``out``); None when the
    folder has none."""
    from medsig.models.artifact import Artifact
    from medsig.models.safety import load_safety

    safety = load_safety(Artifact.find(path), path)
    if safety is None or out.probs is None:
        return None
    heads = [Head.of(h) for h in out.info["heads"]]
    cal = np.asarray(out.probs, dtype=np.float64)
    raw = safety.uncalibrate(heads, cal).astype(np.float64)
    labels: dict[str, Any] = {}
    for h in heads:
        if h.name not in col.labels:
            continue
        y = np.asarray(col.labels[h.name].targets)
        entry: dict[str, Any] = {"calibration": safety.calibration.get(h.name)}
        entry.update(_calibration_pair(h, y, raw[:, h.cols], cal[:, h.cols]))
        if h.name in safety.conformal:
            entry["conformal"] = coverage(h, safety.conformal[h.name], y, cal[:, h.cols])
        labels[h.name] = entry
    result: dict[str, Any] = {"labels": labels}
    if safety.ood is not None:
        result["ood"] = _ood_metrics(safety.ood, out)
    return result


def _aurocs(raw_in: dict[str, np.ndarray], raw_out: dict[str, np.ndarray], s_in: np.ndarray,
            s_out: np.ndarray) -> tuple[float, dict[str, float]]:
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return roc_auc(y, np.r_[s_in, s_out]), {
        c: roc_auc(y, np.r_[raw_in[c], raw_out[c]]) for c in raw_in if len(raw_in) > 1}


def _ood_metrics(gate: Any, out: Any) -> dict[str, Any]:
    """False-reject rate on the split and, per generated outlier kind, AUROC of the gate's
    score (and of each channel's) and the share refused."""
    raw_in = gate.channel_scores(out.image, out.image_stats)
    s_in = gate.combined(raw_in)
    kinds = {}
    for kind, raw in (out.info.get("ood_outliers") or {}).items():
        raw_out = {c: np.asarray(v) for c, v in raw.items()}
        s_out = gate.combined(raw_out)
        auroc, per_channel = _aurocs(raw_in, raw_out, s_in, s_out)
        kinds[kind] = {"n": len(s_out), "auroc": auroc, "channels": per_channel,
                       "refused": float(gate.flag(s_out).mean())}
    return {**gate.info(), "n": int(len(s_in)), "false_reject": float(gate.flag(s_in).mean()),
            "outliers": kinds}


# -- report ------------------------------------------------------------------------------------
def _f(v: Any, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"


def report_blocks(metrics: dict[str, Any], figures: bool = True) -> list[tuple]:
    """Report section "Safe outputs" (empty when no model has them)."""
    per_model = {m: r for m, r in (metrics.get("safe_outputs") or {}).items() if r}
    if not per_model:
        return []
    blocks: list[tuple] = [("h", 2, "Safe outputs: calibration, abstention, refusal"), (
        "p", "Calibration (Platt a, b per sigmoid output; temperature 1 / a per multiclass "
         "head), conformal thresholds and the OOD threshold were fitted on the "
             "val split and are saved with the model; here they meet the evaluation split. "
             "Conformal coverage is the share of labelled images whose prediction set holds "
             "the true state / class (the guarantee: at least 1 − α on average over splits); "
             "abstention is the share whose set is not a single state (\"uncertain — needs "
             "review\").")]
    rows, cov_rows = [], []
    for m, r in per_model.items():
        for label, e in r["labels"].items():
            b, a = e["before"], e["after"]
            temps = "; ".join(f"{_f(a, 2)}, {_f(b, 2)}" for a, b in e["calibration"] or [])
            rows.append([m, display_name(label), temps,
                         f"{_f(b['ece'])} → {_f(a['ece'])}",
                         f"{_f(b['brier'])} → {_f(a['brier'])}", a["n"]])
            c = e.get("conformal")
            if c:
                cov_rows.append([m, display_name(label), _f(c["alpha"], 2), _f(c["target"], 2),
                                 _f(c["coverage"]), _f(c["abstention"]),
                                 _f(c["mean_set_size"], 2), c["n"]])
    blocks.append(("table", ["model", "label", "calibration a, b (per output)",
                             "ECE before → after",
                             "Brier before → after", "n"], rows))
    if cov_rows:
        blocks.append(("table", ["model", "label", "α", "target 1 − α", "coverage",
                                 "abstention", "mean set size", "n"], cov_rows))
    blocks += _ood_blocks(per_model)
    if figures:
        blocks += _reliability(per_model)
    return blocks


def _kind_cell(kind: str, v: dict[str, Any]) -> str:
    per = v.get("channels") or {}
    extra = f" ({', '.join(f'{c} {_f(a)}' for c, a in per.items())})" if per else ""
    return f"{kind} {_f(v['auroc'])}{extra}"


def _ood_blocks(per_model: dict[str, Any]) -> list[tuple]:
    rows = []
    for m, r in per_model.items():
        o = r.get("ood")
        if not o:
            continue
        kinds = o.get("outliers") or {}
        channels = " + ".join(o.get("channels") or ["embedding"])
        if o.get("combine"):
            channels += f" ({o['combine']})"
        rows.append([m, o["method"], channels, _f(o["threshold"], 4),
                     _f(o["false_reject_target"], 2),
                     f"{_f(o['false_reject'])} (n={o['n']})",
                     "; ".join(_kind_cell(k, v) for k, v in kinds.items()) or "–"])
    if not rows:
        return []
    return [("p", "Out-of-distribution gate: an image scoring above the threshold is "
                  "answered \"unlike the images this model was trained on: not assessed\". "
                  "Channels: `embedding` (the encoder's view) and, in newer folders, "
                  "`image_stats` (colour, layout, texture and lesion-shape statistics, "
                  "model-free); their p-values against val are combined. False-reject rate "
                  "= share of the evaluation split refused; AUROC = how well the score (in "
                  "brackets: each channel alone) separates the split from generated images "
                  "of each kind (goal ≥ 0.95; bench/ood.py adds other medical image kinds)."),
            ("table", ["model", "score", "channels", "threshold", "target false-reject",
                       "false-reject on split", "AUROC vs generated outliers"], rows)]


def _reliability(per_model: dict[str, Any]) -> list[tuple]:
    from medsig.evaluate.figures import line_figure as _line_figure

    out = []
    for m, r in per_model.items():
        for label, e in r["labels"].items():
            series = {}
            for when in ("before", "after"):
                bins = [b for b in e[when]["bins"] if b["count"]]
                series[f"{when} (ECE {_f(e[when]['ece'])})"] = (
                    [b["mean_confidence"] for b in bins], [b["fraction_positive"] for b in bins])
            out.append(("img", f"calibration-{m}-{label}", _line_figure(
                f"Reliability before / after calibration: {m}, {display_name(label)}",
                "mean predicted probability", "observed frequency", series, diagonal=True,
                markers=True), f"Reliability of {label} ({m}) before and after calibration"))
    return out
