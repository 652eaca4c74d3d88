"""Read the table of a collection: CSV, Parquet or JSONL, values kept as written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medsig.errors import DataError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
                  ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table with every scalar kept as a string ("" for empty cells).

    List-valued cells (Parquet / JSONL) are kept as Python lists. The index is 0..n-1;
    user-facing row numbers are `index + 1`.
    """
    path = Path(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported table type '{path.suffix}' (use .csv, .tsv, .parquet "
                        "or .jsonl)", file=path)
    if not path.is_file():
        raise DataError("table file not found", file=path)
    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False,
                                sep="\t" if kind == "tsv" else ",")
        elif kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = _read_jsonl(path)
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {kind.upper()} table: {first}", file=path) from None
    if len(frame) == 0:
        raise DataError("the table has no rows", file=path)
    frame.columns = [str(c) for c in frame.columns]
    frame = frame.reset_index(drop=True)
    for col in frame.columns:
        if frame[col].dtype != object:
            frame[col] = frame[col].map(_to_str)
        else:
            frame[col] = frame[col].map(lambda v: v if isinstance(v, (list, dict)) else _to_str(v))
    return frame


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); errors name the line number."""
    records = []
    with path.open(encoding="utf-8-sig") as f:  # a leading BOM (Excel, Windows) is fine
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                col = f", character {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
                raise DataError(f"line {number}{col}: invalid JSON ({reason})",
                                file=path) from None
            if not isinstance(record, dict):
                raise DataError(f"line {number}: expected a JSON object, got "
                                f"{type(record).__name__}", file=path)
            records.append(record)
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _to_str(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays / scalars
        value = value.tolist()
        if isinstance(value, list):
            return value  # type: ignore[return-value]
    return str(value)


def require_columns(frame: pd.DataFrame, columns: dict[str, str | None], file: Path) -> None:
    """Raise a DataError naming the spec key and the missing column."""
    for key, col in columns.items():
        if col and col not in frame.columns:
            have = ", ".join(frame.columns[:12]) + (" ..." if len(frame.columns) > 12 else "")
            raise DataError(f"unknown column (spec key '{key}'); the table has: {have}",
                            file=file, column=col)
