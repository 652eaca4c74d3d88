"""The test-set ledger: how often has this test set been looked at?

Every evaluation that reads a collection's test rows is counted in ``test_ledger.json``
beside the splits file (or the table when the split is a column). The test rows are
fingerprinted (sha256 of their sorted ids and groups), so a re-split starts a new count.
Per collection and fingerprint the ledger keeps the number of uses and the last uses (when,
which models, why: ``eval``, ``select`` or ``retention``). The report states the count and
warns when something was chosen on the test set: an alpha or model selection run on it, or
repeated evaluations (results after the first are optimistic once anything was picked
from them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

LEDGER = "test_ledger.json"
KEEP_USES = 200  # the file stays small: older uses are counted, not listed


def rows_fingerprint(ids: list[str], groups: list[str]) -> str:
    """sha256 of the sorted (id, group) pairs of the test rows."""
    pairs = sorted(zip(map(str, ids), map(str, groups)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def ledger_path(spec: Any) -> Path:
    """``test_ledger.json`` beside the splits CSV, else beside the table."""
    anchor = spec.splits_path if getattr(spec, "splits", None) else spec.table_path
    return Path(anchor).parent / LEDGER


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": 1, "collections": {}}
    return data if isinstance(data, dict) and "collections" in data \
        else {"version": 1, "collections": {}}


def record_use(spec: Any, ids: list[str], groups: list[str], models: dict[str, str],
               purpose: str = "eval") -> dict[str, Any]:
    """Count one use of the test set; returns this test set's entry (with ``warnings``)."""
    path = ledger_path(spec)
    data = _read(path)
    fp = rows_fingerprint(ids, groups)
    per = data["collections"].setdefault(str(spec.name), {})
    entry = per.setdefault(fp, {"n_rows": len(ids), "first_used": None, "uses": 0,
                                "selections": 0, "recent": []})
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry["first_used"] = entry["first_used"] or now
    entry["uses"] += 1
    entry["selections"] += int(purpose == "select")
    entry["recent"] = (entry["recent"] + [{"time": now, "purpose": purpose,
                                           "models": sorted(models)}])[-KEEP_USES:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{LEDGER}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        written = str(path)
    except OSError:  # a read-only data folder: report the use, do not fail the evaluation
        written = None
    return summary(entry, fp, written)


def summary(entry: dict[str, Any], fp: str, path: str | None) -> dict[str, Any]:
    warnings = []
    if entry["selections"]:
        warnings.append(f"models or blend weights were chosen on this test set "
                        f"({entry['selections']} selection run(s)): its metrics are "
                        "optimistic; choose on val and keep a fresh test set")
    if entry["uses"] > 1:
        warnings.append(f"this test set has been evaluated {entry['uses']} times: if any "
                        "model, setting or checkpoint was picked after seeing its results, "
                        "the later results are optimistic")
    return {"fingerprint": fp, "n_rows": entry["n_rows"], "uses": entry["uses"],
            "selections": entry["selections"], "first_used": entry["first_used"],
            "file": path, "warnings": warnings}


def ledger_section(metrics: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Report blocks: how many times this test set was used, and warnings."""
    led = metrics.get("ledger")
    if not led:
        return []
    text = (f"This test set ({led['n_rows']} rows, fingerprint {led['fingerprint'][:12]}) has "
            f"been used {led['uses']} time(s) since {led['first_used']}, this run included "
            f"(ledger: {led.get('file') or 'not writable'}).")
    return [("h", 2, "Test-set ledger"), ("p", text),
            *(("p", f"**Warning:** {w}.") for w in led["warnings"])]
