"""The evaluation report: markdown + one self-contained HTML file from ``metrics.json``.

The document is built once as blocks (headings, paragraphs, tables, figures) and rendered
twice: markdown (figures as PNG files in ``figures/``) and HTML (inline CSS, figures as
base64 PNG, no scripts, no external URLs). Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsig.evaluate.clinical import display_name
from medsig.evaluate.clinical import report_blocks as clinical_blocks
from medsig.evaluate.figures import figure as _figure
from medsig.evaluate.figures import fmt, fmt_ci
from medsig.evaluate.figures import line_figure as _line_figure
from medsig.evaluate.figures import png as _png

Block = tuple[Any, ...]

HOW_TO_READ = [
    "Every number is measured on one split of one dataset. Brackets give a 95% confidence "
    "interval from a **group bootstrap**: whole cases / patients (the spec's group column) "
    "are resampled with replacement, all images of a case together, because images of one "
    "case are not independent. A wide interval means the split is too small to tell.",
    "**Paired differences** score every model on the same resamples as the first model. "
    "When the interval of the difference crosses 0 the verdict is *not significant*: the "
    "data do not show that one model is better, whatever the point estimates say.",
    "The **winner** column names the best point estimate; it is *clear* only when the paired "
    "difference is significant.",
    "**Global recall** ranks each query against every item of the split; **batch-wise** "
    "recall ranks it only inside random batches (as many papers report), which is much "
    "easier; the two are not comparable. Items with identical text (or the same class, where "
    "stated) count as matches (multi-positives).",
    "Clustering intervals keep the k-means clusters fixed and resample the rows; NMI "
    "intervals are shifted by the bootstrap bias, because duplicated rows make clusters look "
    "tighter, then clipped to NMI's range [0, 1].",
    "These are research metrics. Nothing here is a diagnostic claim or evidence of clinical "
    "validity; a model must be validated prospectively before any clinical use.",
]


# -- formatting --------------------------------------------------------------------------------
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# -- figures -----------------------------------------------------------------------------------
def roc_figures(metrics: dict[str, Any]) -> list[Block]:
    out: list[Block] = []
    for task, per_label in (_get(metrics, "curves", "roc") or {}).items():
        for label, per_model in per_label.items():
            series = {f"{m} (AUC {fmt(c['auc'])})": (c["fpr"], c["tpr"])
                      for m, c in per_model.items() if c}
            if series:
                out.append(("img", f"roc-{task}-{label}", _line_figure(
                    f"ROC, {task}: {label}", "false positive rate", "true positive rate",
                    series, diagonal=True), f"ROC curve of {label} ({task}, micro-averaged "
                    "over the label's outputs), every model"))
    return out


def recall_figure(metrics: dict[str, Any]) -> list[Block]:
    per_model = _get(metrics, "curves", "recall_at_k") or {}
    series = {f"{m} {d.replace('_to_', '→')}": (c["k"], c[d])
              for m, c in per_model.items() for d in ("image_to_text", "text_to_image")}
    if not series:
        return []
    return [("img", "recall-at-k", _line_figure("Global Recall@K", "K", "recall", series),
             "Global Recall@K (identical-text positives), both directions, every model")]


def reliability_figures(metrics: dict[str, Any]) -> list[Block]:
    out: list[Block] = []
    for task in ("classification", "zeroshot"):
        labels: dict[str, dict[str, Any]] = {}
        for m, res in (metrics.get(task) or {}).items():
            for label, lm in (res.get("labels") or {}).items():
                if isinstance(lm, dict) and lm.get("calibration"):
                    labels.setdefault(label, {})[m] = lm["calibration"]
        for label, per_model in labels.items():
            series = {}
            for m, cal in per_model.items():
                bins = [b for b in cal["bins"] if b["count"]]
                series[f"{m} (ECE {fmt(cal['ece'])})"] = (
                    [b["mean_confidence"] for b in bins], [b["fraction_positive"] for b in bins])
            out.append(("img", f"reliability-{task}-{label}", _line_figure(
                f"Reliability, {task}: {label}", "mean predicted probability",
                "observed frequency", series, diagonal=True, markers=True),
                f"Reliability diagram of {label} ({task}); the diagonal is perfect calibration"))
    return out


def tsne_figure(metrics: dict[str, Any]) -> list[Block]:
    tsne = _get(metrics, "curves", "tsne") or {}
    models = tsne.get("models") or {}
    if not models:
        return []
    values = np.array(tsne["values"], dtype=object)
    names, counts = np.unique(values.astype(str), return_counts=True)
    top = [str(n) for n in names[np.argsort(-counts, kind="stable")][:12]]
    fig = _figure(4.2 * len(models) + 1.8, 4.0)
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    for i, (m, xy) in enumerate(models.items()):
        ax = fig.add_subplot(1, len(models), i + 1)
        x, y = np.asarray(xy["x"], float), np.asarray(xy["y"], float)
        shown = np.isin(values.astype(str), top)
        ax.scatter(x[~shown], y[~shown], s=6, c="#bbb", label="other")
        for j, name in enumerate(top):
            sel = values.astype(str) == name
            ax.scatter(x[sel], y[sel], s=8, color=cmap(j % 20), label=name)
        ax.set(title=m, xticks=[], yticks=[])
        ax.title.set_fontsize(10)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), title=tsne["label"])
    return [("img", "tsne", _png(fig), f"t-SNE of the image embeddings ({len(values)} images), "
             f"coloured by {tsne['label']} (12 most frequent classes)")]


# -- sections ----------------------------------------------------------------------------------
def _models(metrics: dict[str, Any]) -> list[str]:
    return list(metrics.get("model_order") or metrics.get("models") or [])


def headline_section(metrics: dict[str, Any]) -> list[Block]:
    models = _models(metrics)
    rows = []
    for metric, per in (metrics.get("headline") or {}).items():
        w = (metrics.get("winners") or {}).get(metric) or {}
        rows.append([metric] + [fmt_ci(per.get(m)) for m in models]
                    + [f"{w.get('model', '–')} ({w.get('verdict', '–')})"])
    blocks: list[Block] = [("h", 2, "Headline metrics (95% group-bootstrap CI)")]
    blocks.append(("table", ["metric", *models, "winner"], rows))
    prow = []
    for metric, per in (metrics.get("paired") or {}).items():
        for m, p in per.items():
            prow.append([metric, f"{m} − {models[0]}", fmt(p.get("difference")),
                         f"[{fmt(p.get('low'))}, {fmt(p.get('high'))}]", p.get("verdict", "–")])
    if prow:
        blocks += [("h", 2, f"Paired differences vs {models[0]}"),
                   ("table", ["metric", "difference", "value", "95% CI", "verdict"], prow)]
    return blocks


def _per_label_table(metrics: dict[str, Any], task: str, keys: Sequence[tuple[str, str]]
                     ) -> list[Block]:
    models = _models(metrics)
    res = metrics.get(task) or {}
    skipped = [f"{m}: {r['skipped']}" for m, r in res.items() if "skipped" in r]
    labels = []
    for m in models:
        for label in (_get(res, m, "labels") or {}):
            if label not in labels:
                labels.append(label)
    rows = []
    for label in labels:
        for title, path in keys:
            vals = [fmt(_get(res, m, "labels", label, *path.split("/"))) for m in models]
            if any(v != "–" for v in vals):
                rows.append([display_name(label), title, *vals])
    blocks: list[Block] = []
    if rows:
        blocks.append(("table", ["label", "metric", *models], rows))
    if skipped:
        blocks.append(("p", "Skipped: " + "; ".join(skipped)))
    return blocks


CLASSIFICATION_KEYS = [
    ("ROC AUC", "roc_auc"), ("macro ROC AUC", "macro/roc_auc"), ("OvR ROC AUC",
                                                                  "macro_roc_auc_ovr"),
    ("average precision", "average_precision"), ("macro AP", "macro/average_precision"),
    ("sensitivity @ saved threshold", "sensitivity"), ("specificity @ saved threshold",
                                                       "specificity"),
    ("macro sensitivity @ saved", "macro/sensitivity"), ("macro F1 @ saved", "macro/f1"),
    ("F1 @ saved threshold", "f1"), ("sensitivity @ 0.5", "at_0.5/sensitivity"),
    ("specificity @ 0.5", "at_0.5/specificity"), ("macro F1 @ 0.5", "macro_at_0.5/f1"),
    ("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
    ("macro F1", "macro_f1"), ("ECE", "calibration/ece"), ("Brier", "calibration/brier"),
]
ZEROSHOT_KEYS = [("top-1 accuracy", "top1_accuracy"), ("ROC AUC", "roc_auc"),
                 ("macro ROC AUC", "macro/roc_auc"), ("OvR ROC AUC", "macro_roc_auc_ovr"),
                 ("ECE", "calibration/ece")]
CLUSTER_KEYS = [("NMI", "nmi"), ("AMI", "ami"), ("ARI", "ari"), ("purity", "purity"),
                ("silhouette (labels)", "silhouette"), ("k", "k"), ("rows", "n")]


def retrieval_section(metrics: dict[str, Any]) -> list[Block]:
    models = _models(metrics)
    res = metrics.get("retrieval") or {}
    rows = []
    for part, title in (("global_text", "global, identical text"),
                        ("global_class", "global, same class"),
                        ("batchwise_text", "batch-wise, identical text"),
                        ("batchwise_class", "batch-wise, same class")):
        for d in ("image_to_text", "text_to_image"):
            for k in ("recall@1", "recall@5", "recall@10", "mrr"):
                vals = [fmt(_get(res, m, part, d, k)) for m in models]
                if any(v != "–" for v in vals):
                    rows.append([title, f"{d.replace('_to_', '→')} {k}", *vals])
    rows.append(["distractors", "accuracy (chance)"] + [
        f"{fmt(_get(res, m, 'distractor', 'accuracy'))} "
        f"({fmt(_get(res, m, 'distractor', 'chance'))})" for m in models])
    bs = metrics.get("batchwise_size")
    blocks: list[Block] = [("h", 2, "Retrieval"), ("p", f"Batch-wise: random batches of {bs} "
                                                       "pairs; global: the whole split."),
                           ("table", ["pool", "metric", *models], rows)]
    skipped = [f"{m}: {r['skipped']}" for m, r in res.items() if "skipped" in r]
    return blocks + ([("p", "Skipped: " + "; ".join(skipped))] if skipped else [])


SMALL_SUBGROUP = 10  # fewer cases (groups) than this: flagged, its metrics are noise


def _small(table: dict[str, Any], value: str) -> str:
    return " ⚠ small" if table["groups"][value] < SMALL_SUBGROUP else ""


def subgroup_section(metrics: dict[str, Any]) -> list[Block]:
    models = _models(metrics)
    blocks: list[Block] = []
    for column, table in (metrics.get("subgroups") or {}).items():
        blocks.append(("h", 3, f"Subgroups by {column}"))
        values = list(table["counts"])
        rows = [[v + _small(table, v), table["counts"][v], table["groups"][v]] for v in values]
        blocks.append(("table", [column, "images", "groups"], rows))
        mrows = []
        for metric, per in table["metrics"].items():
            for v in values:
                n = f"{table['counts'][v]} ({table['groups'][v]})"
                mrows.append([metric, v + _small(table, v), n,
                              *[fmt(_get(per, v, m)) for m in models]])
        if mrows:
            blocks.append(("table", ["metric", column, "n images (groups)", *models], mrows))
    if blocks:
        blocks.insert(0, ("h", 2, "Subgroups (point estimates; small groups are noisy)"))
        blocks.insert(1, ("p", f"⚠ small: fewer than {SMALL_SUBGROUP} cases (groups); its "
                               "metrics are too noisy to compare. \"not recorded\": the "
                               "column is empty or a missing value for those rows."))
    return blocks


def leakage_section(metrics: dict[str, Any]) -> list[Block]:
    leak = metrics.get("leakage") or {}
    blocks: list[Block] = [
        ("h", 2, "Split leakage"),
        ("p", f"{leak.get('n_leaked_groups', '?')} groups appear in more than one split "
              f"({leak.get('n_groups', '?')} groups, {leak.get('n_rows', '?')} rows).")]
    dup = leak.get("near_duplicates")
    if not dup:
        return blocks + [("p", "Near-duplicate images across splits: not checked.")]
    counts, other = dup.get("counts") or {}, dup.get("other_group") or {}
    found = sum(counts.values())
    skipped = sum((dup.get("skipped") or {}).values())
    text = (f"Near-duplicate images across splits (model-free 16x16 signatures, cosine >= "
            f"{dup.get('threshold')}; {dup.get('n_images')} images compared"
            + (f", {skipped} unreadable" if skipped else "") + "): ")
    if not found:
        return blocks + [("p", text + "none found.")]
    blocks.append(("p", text + f"{found} image(s) have a near-duplicate in an earlier split; "
                   "those in another group escaped the group check (check the group column "
                   "or remove them before trusting the metrics)."))
    blocks.append(("table", ["splits", "images with a near-duplicate", "in another group"],
                   [[k, v, other.get(k, 0)] for k, v in counts.items()]))
    ex = dup.get("examples") or []
    if ex:
        blocks.append(("table", ["image", "split", "near-duplicate of", "its split", "cosine",
                                 "same group"],
                       [[e["id"], e["split"], e["duplicate_of"], e["split_of_duplicate"],
                         fmt(e["cosine"]), "yes" if e["same_group"] else "no"] for e in ex]))
    return blocks


def build_blocks(metrics: dict[str, Any], figures: bool = True) -> list[Block]:
    """The whole report as blocks."""
    spec = metrics.get("spec") or {}
    models = _models(metrics)
    blocks: list[Block] = [
        ("h", 1, f"Evaluation: {spec.get('name', '?')}, split {metrics.get('split')}"),
        ("p", f"{metrics.get('n_rows')} images in {metrics.get('n_groups')} groups; "
              f"{metrics.get('n_boot')} bootstrap resamples of groups; "
              f"seed {metrics.get('seed')}."),
        ("table", ["model", "path", "kind", "objective", "images skipped", "cache"],
         [[m, _get(metrics, "models", m, "path"), _get(metrics, "models", m, "kind"),
           _get(metrics, "models", m, "objective") or "–",
           sum((_get(metrics, "models", m, "skipped_images") or {}).values()),
           _get(metrics, "models", m, "cache")] for m in models]),
        ("h", 2, "How to read this report"), ("ul", HOW_TO_READ),
    ]
    blocks += headline_section(metrics)
    blocks += clinical_blocks(metrics)  # PPV / NPV at the saved thresholds, prevalence
    for task, title, keys in (("classification", "Classification (per label)",
                               CLASSIFICATION_KEYS),
                              ("zeroshot", "Zero-shot classification", ZEROSHOT_KEYS),
                              ("clustering", "Clustering (k-means vs labels)", CLUSTER_KEYS)):
        if task in metrics:
            blocks += [("h", 2, title), *_per_label_table(metrics, task, keys)]
    if "retrieval" in metrics:
        blocks += retrieval_section(metrics)
    from medsig.evaluate.safety import report_blocks

    blocks += report_blocks(metrics, figures)  # calibration, conformal, OOD
    blocks += subgroup_section(metrics)
    blocks += extra_sections(metrics)
    blocks += leakage_section(metrics)
    if figures:
        figs = roc_figures(metrics) + recall_figure(metrics) + reliability_figures(metrics) \
            + tsne_figure(metrics)
        if figs:
            blocks += [("h", 2, "Figures"), *figs]
    return with_contents(blocks)


def with_contents(blocks: list[Block]) -> list[Block]:
    """A table of contents (every level-2 heading) after the report's first paragraph."""
    titles = [b[2] for b in blocks if b[0] == "h" and b[1] == 2]
    at = next((i + 1 for i, b in enumerate(blocks) if b[0] == "p"), 1)
    return blocks[:at] + [("h", 2, "Contents"), ("toc", titles)] + blocks[at:]


def anchor(title: str) -> str:
    """The GitHub-style anchor of a heading (also the id the HTML report gives it)."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.strip().lower()))


def extra_sections(metrics: dict[str, Any]) -> list[Block]:
    """Retention check, hidden-subgroup audit and test-set ledger (their own modules)."""
    from medsig.evaluate.audit import audit_section
    from medsig.evaluate.ledger import ledger_section
    from medsig.evaluate.retention import retention_section

    return ledger_section(metrics) + retention_section(metrics) + audit_section(metrics)


# -- rendering ---------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "figure"


def render_markdown(blocks: list[Block], fig_dir: str = "figures") -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif b[0] == "toc":
            out.append("\n".join(f"- [{t}](#{anchor(t)})" for t in b[1]))
        elif b[0] == "table":
            cell = [[str(c).replace("|", "\\|") for c in r] for r in [b[1], *b[2]]]
            lines = ["| " + " | ".join(cell[0]) + " |", "|" + "---|" * len(cell[0])]
            out.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in cell[1:]]))
        elif b[0] == "img":
            out.append(f"![{b[3]}]({fig_dir}/{_slug(b[1])}.png)")
    return "\n\n".join(out) + "\n"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8}tr:nth-child(even) td{background:#fafbfc}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:420px}img{max-width:100%}
"""


def render_html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"]

    def inline(text: str) -> str:
        t = esc(str(text))
        t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
        return re.sub(r"\*(.+?)\*", r"<em>\1</em>", t)

    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]} id='{esc(anchor(b[2]))}'>{esc(b[2])}</h{b[1]}>")
        elif b[0] == "toc":
            out.append("<ul class='toc'>" + "".join(
                f"<li><a href='#{esc(anchor(t))}'>{esc(t)}</a></li>" for t in b[1]) + "</ul>")
        elif b[0] == "p":
            out.append(f"<p>{inline(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{esc(str(c))}</th>" for c in b[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode("ascii")
            out.append(f"<figure><img alt='{esc(b[3])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(b[3])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(metrics: dict[str, Any], out: str | Path, figures: bool = True
                 ) -> tuple[Path, Path]:
    """Write out/report.md (+ out/figures/*.png) and the self-contained out/report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(metrics, figures)
    imgs = [b for b in blocks if b[0] == "img"]
    if imgs:
        (out / "figures").mkdir(exist_ok=True)
        for b in imgs:
            (out / "figures" / f"{_slug(b[1])}.png").write_bytes(b[2])
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(blocks))
    title = f"medsig evaluation: {_get(metrics, 'spec', 'name')} ({metrics.get('split')})"
    page.write_text(render_html(blocks, title))
    return md, page
