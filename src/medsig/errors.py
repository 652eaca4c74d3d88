"""User-facing errors: one line that names the file, row and column at fault."""

from __future__ import annotations

from pathlib import Path


class MedsigError(Exception):
    """An error caused by user input. The CLI prints it as one line and exits non-zero.

    >>> str(MedsigError("unknown value 'Purple'", file="wounds.csv", row=12, column="urgency"))
    "wounds.csv: row 12: column 'urgency': unknown value 'Purple'"
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.row = row
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column:
            parts.append(f"column '{self.column}'")
        parts.append(self.message)
        return ": ".join(parts)


class SpecError(MedsigError):
    """The dataset spec (YAML) is invalid."""


class DataError(MedsigError):
    """The table or its values do not match the spec."""


class ImageError(MedsigError):
    """An image could not be used. `reason` is a short stable tag used to count skips."""

    REASONS = ("missing", "empty", "truncated", "not_an_image", "too_large", "unreadable",
               "not_a_file", "outside_root")

    def __init__(self, reason: str, message: str, *, file: str | Path | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown image error reason {reason!r}")
        self.reason = reason
        super().__init__(message, file=file)


class ConfigError(MedsigError):
    """A training / evaluation / serving config is invalid."""
