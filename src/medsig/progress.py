"""Progress and console output that behave when piped to a log.

On a terminal: a live tqdm bar and a console as wide as the window. Not on a terminal (a log
file, CI, ``> log 2>&1``): no carriage-return bars, only a plain line per ``EVERY_PCT`` % of
progress (at most one per ``MIN_INTERVAL_S`` seconds, and one per ``HEARTBEAT_S`` seconds
while anything moves), and a console that never wraps lines or cuts table cells.
``MEDSIG_PROGRESS=off`` turns progress output off everywhere. Hugging Face's own bars
("Loading weights", "Writing model shards") are turned off when stderr is not a terminal
(:func:`quiet_library_bars`, run when medsig is imported; ``HF_HUB_DISABLE_PROGRESS_BARS=0``
keeps them).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

EVERY_PCT = 10.0
MIN_INTERVAL_S = 5.0
HEARTBEAT_S = 60.0
PIPED_WIDTH = 200  # console width when not a terminal (tables grow past it, never wrap)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def quiet_library_bars() -> None:
    """Hugging Face progress bars off when stderr is not a terminal (set before import)."""
    if is_terminal(sys.stderr):
        return
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") != "1":
        return
    if "huggingface_hub" in sys.modules:  # imported before medsig: switch it off directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class LineProgress:
    """The part of tqdm's interface medsig uses, printing occasional whole lines."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream
        self.start = self.last_time = time.monotonic()
        self.last_n, self.postfix, self.lines, self.closed = initial, "", 0, False

    def _say(self, text: str) -> None:
        print(text, file=self.stream if self.stream is not None else sys.stderr, flush=True)
        self.lines += 1

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        verb = "done in" if final else "after"
        return f"{self.desc}: {done} {self.unit}{pct} {verb} {elapsed:.1f} s{tail}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        since = now - self.last_time
        step = 100 * (self.n - self.last_n) / self.total if self.total else 0.0
        if (step >= EVERY_PCT and since >= MIN_INTERVAL_S) or since >= HEARTBEAT_S:
            self._say(self._line())
            self.last_time, self.last_n = now, self.n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        self._say(message)

    def close(self) -> None:
        if self.closed:
            return
        if time.monotonic() - self.start >= MIN_INTERVAL_S or self.lines:
            self._say(self._line(final=True))
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off(LineProgress):
    def _say(self, text: str) -> None:
        pass


def progress_bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, leave: bool = False, stream: TextIO | None = None
                 ) -> Any:
    """A tqdm bar on a terminal, else a :class:`LineProgress` (or nothing when disabled)."""
    if disable or os.environ.get("MEDSIG_PROGRESS", "").lower() in ("off", "0", "false"):
        return _Off(total, desc, unit, initial)
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    file=stream)
    return LineProgress(total, desc, unit, initial, stream)


def make_console(stderr: bool = False) -> Any:
    """A rich Console; when not a terminal: no line wrapping and wide tables (see
    :func:`print_table`), so paths and numbers are never split or cut in a log."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if is_terminal(stream):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPED_WIDTH, soft_wrap=True)


def print_table(console: Any, table: Any) -> None:
    """Print a rich Table; when not a terminal, at its natural width (no cut cells)."""
    if console.is_terminal:
        console.print(table)
        return
    width = max(console.width, console.measure(table).maximum)
    console.print(table, width=width, soft_wrap=False)
