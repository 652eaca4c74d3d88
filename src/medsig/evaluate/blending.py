"""Choosing a blend (WiSE-FT) alpha on val: blend, evaluate every alpha on the in-domain
metric and the spec's retention check, pick (``medsig model blend --select``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsig.errors import ConfigError
from medsig.evaluate.retention import KEEP, RECOVER, alpha_table, pick_alpha
from medsig.evaluate.run import evaluate
from medsig.models.artifact import clean_json
from medsig.spec import DatasetSpec


def choose_alpha(spec: str | Path, base: str, tuned: str, alphas: Sequence[float],
                 out: str | Path, metric: str, split: str = "val", **kwargs: Any
                 ) -> dict[str, Any]:
    """Blend, evaluate every alpha on ``split`` (in-domain ``metric`` + retention), pick.

    The retention check runs on the same ``split`` of its collection (never test), so the
    choice never looks at a test set. The ratios of each row (gain kept, retained, drop
    recovered) get 95% intervals over paired bootstrap resamples (``alpha_table``). Writes
    ``out/blend_selection.json``.
    """
    from medsig.models.blend import alpha_name, blend

    loaded = DatasetSpec.load(spec)
    if not loaded.retention:
        raise ConfigError("the spec names no retention check (retention: {metric: ...})",
                          file=loaded.path)
    alphas = sorted(set(alphas) | {0.0, 1.0})
    out = Path(out)
    folders = blend(base, tuned, alphas, out)
    models = {alpha_name(a): str(f) for a, f in zip(alphas, folders)}
    res = evaluate(spec, models, tasks=[metric.split("/")[0]], split=split,
                   out=out / "select", report=False, retention_split=split, audit=False,
                   purpose="select", replicates=True, **kwargs)
    in_domain = (res.get("headline") or {}).get(metric)
    if in_domain is None:
        raise ConfigError(f"--metric '{metric}' was not measured (measured: "
                          f"{', '.join(res.get('headline') or {})})")
    rows = alpha_table(in_domain, res["retention"]["models"],
                       {alpha_name(a): a for a in alphas})
    choice = {"metric": metric, "split": split, "retention": {
        k: v for k, v in res["retention"].items() if k != "models"},
        "rows": rows, "choice": pick_alpha(rows), "keep": KEEP, "recover": RECOVER}
    (out / "blend_selection.json").write_text(json.dumps(clean_json(choice), indent=1) + "\n")
    return choice
