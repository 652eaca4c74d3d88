"""Micro-batching: concurrent requests share one model call, run in a worker thread.

Requests put an item (a pixel tensor, a text) into a pending list and await a future. A
worker task takes up to `max_batch` items and runs the model on them in a single-thread
executor, so the event loop stays responsive and the model is never entered by two threads
at once. A lone request is dispatched at once; only when several are pending (concurrent
load) does the worker wait up to `max_wait_ms` for the batch to fill. While the model runs,
new requests accumulate and form the next batch. With batching disabled each request is its
own model call (still in the worker thread).

The queue is bounded: with `max_queue` requests waiting (or, without batching, in flight),
`submit` raises :class:`QueueFull` at once, which the app answers with 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BatchInfo:
    size: int
    wait_ms: float
    model_ms: float


def stack_tensors(items: Sequence[Any]) -> Any:
    from medsig.data.patches import stack_pixels  # tensors, or NaFlex Patches

    return stack_pixels(list(items))


def as_list(items: Sequence[Any]) -> list[Any]:
    return list(items)


def model_executor() -> ThreadPoolExecutor:
    """The one worker thread that runs every model call of an app."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsig-model")


class QueueFull(RuntimeError):
    """The batcher's queue is full: the caller should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1) -> None:
        super().__init__(f"server busy: {waiting} requests waiting for the model; retry in "
                         f"{retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


class MicroBatcher:
    """Collect concurrent `submit(item)` calls into batches for `fn(collate(items))`.

    `fn` returns one row per item (array, tensor or list); `submit` returns that row and a
    `BatchInfo`.
    """

    def __init__(self, fn: Callable[[Any], Any], *, collate: Callable[[Sequence[Any]], Any],
                 executor: Executor, max_batch: int = 32, max_wait_ms: float = 5.0,
                 enabled: bool = True, max_queue: int = 256) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.fn, self.collate, self.executor = fn, collate, executor
        self.max_queue, self._inflight = max_queue, 0
        self.max_batch = max_batch if enabled else 1
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self._pending: list[tuple[Any, asyncio.Future, float]] = []
        self._has_items: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> tuple[Any, BatchInfo]:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            if self._inflight >= self.max_queue:
                raise QueueFull(self._inflight)
            self._inflight += 1
            try:
                start = time.perf_counter()
                rows = await loop.run_in_executor(self.executor, self._call, [item])
            finally:
                self._inflight -= 1
            ms = (time.perf_counter() - start) * 1000
            self.batches += 1
            self.items += 1
            return rows[0], BatchInfo(1, 0.0, ms)
        if len(self._pending) >= self.max_queue:
            raise QueueFull(len(self._pending))
        self._ensure_worker()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((item, fut, time.perf_counter()))
        assert self._has_items is not None and self._full is not None
        self._has_items.set()
        if len(self._pending) >= self.max_batch:
            self._full.set()
        return await fut

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._has_items, self._full = asyncio.Event(), asyncio.Event()
            if self._pending:
                self._has_items.set()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._has_items is not None and self._full is not None
        while True:
            await self._has_items.wait()
            if 1 < len(self._pending) < self.max_batch and self.max_wait > 0:  # lone: go now
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.max_wait)
            batch = self._pending[:self.max_batch]
            self._pending = self._pending[self.max_batch:]
            if len(self._pending) < self.max_batch:
                self._full.clear()
            if not self._pending:
                self._has_items.clear()
            batch = [b for b in batch if not b[1].done()]  # drop cancelled requests
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[tuple[Any, asyncio.Future, float]]) -> None:
        start = time.perf_counter()
        try:
            rows = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._call, [item for item, _, _ in batch])
        except asyncio.CancelledError:  # closing: nobody is left waiting forever
            self._fail(batch, RuntimeError("server shutting down"))
            raise
        except Exception as exc:  # the model failed: every waiting request gets the error
            self._fail(batch, exc)
            return
        end = time.perf_counter()
        self.batches += 1
        self.items += len(batch)
        for row, (_, fut, queued) in zip(rows, batch):
            if not fut.done():
                fut.set_result((row, BatchInfo(len(batch), (start - queued) * 1000,
                                               (end - start) * 1000)))

    @staticmethod
    def _fail(batch: list[tuple[Any, asyncio.Future, float]], exc: BaseException) -> None:
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(exc)

    def _call(self, items: list[Any]) -> list[Any]:
        out = self.fn(self.collate(items))
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        rows = list(np.asarray(out)) if not isinstance(out, list) else out
        if len(rows) != len(items):
            raise RuntimeError(f"model returned {len(rows)} rows for {len(items)} inputs")
        return rows

    async def close(self) -> None:
        """Stop the worker; requests still waiting get an error."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        self._fail(self._pending, RuntimeError("server shutting down"))
        self._pending = []
