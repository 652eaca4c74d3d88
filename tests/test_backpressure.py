"""Server backpressure: a bounded batcher queue, a concurrency limit, 503 + Retry-After."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from medsig.serve.batching import MicroBatcher, QueueFull, as_list
from medsig.serve.limits import ConcurrencyLimit


@pytest.mark.parametrize("enabled", [True, False])
def test_batcher_queue_is_bounded(enabled):
    gate = threading.Event()

    def slow(items):
        gate.wait(10)
        return list(items)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(slow, collate=as_list, executor=ex, max_batch=2, max_wait_ms=0,
                             enabled=enabled, max_queue=3)
            first = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
            await asyncio.sleep(0.05)  # the worker takes its first batch (then blocks)
            waiting = [asyncio.ensure_future(b.submit(i)) for i in range(3, 6)]
            await asyncio.sleep(0.05)
            done = [t for t in waiting if t.done()]
            refused = [t.exception() for t in done]
            gate.set()
            served = await asyncio.gather(*first, *[t for t in waiting if not t.done()])
            await b.close()
            return refused, served

    refused, served = asyncio.run(main())
    assert refused and all(isinstance(e, QueueFull) for e in refused)
    assert "retry in 1 s" in str(refused[0])
    assert len(served) + len(refused) == 6


def test_a_lone_request_is_not_held_for_the_batch_wait():
    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(as_list, collate=as_list, executor=ex, max_batch=32,
                             max_wait_ms=20_000)
            row, info = await asyncio.wait_for(b.submit(7), 15)
            await b.close()
            return row, info

    row, info = asyncio.run(main())
    assert row == 7 and info.size == 1 and info.wait_ms < 10_000  # not the 20 s batch wait


async def _blocking_app(scope, receive, send):
    await asyncio.sleep(0.3)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_concurrency_limit_answers_503_json_with_retry_after():
    limited = ConcurrencyLimit(_blocking_app, limit=2)

    async def main():
        transport = httpx.ASGITransport(app=limited)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rs = await asyncio.gather(*(client.post("/v1/predict") for _ in range(5)),
                                      client.get("/health"))
        return rs

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs[:5])
    assert codes == [200, 200, 503, 503, 503]
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "overloaded"
    assert rs[5].status_code == 200  # health is never refused
    assert limited.active == 0 and limited.refused == 3


def test_app_maps_a_full_queue_to_503():
    from fastapi import FastAPI

    from medsig.serve.app import _install_error_handlers

    app = FastAPI()
    _install_error_handlers(app)

    @app.get("/x")
    async def x():
        raise QueueFull(256)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return await client.get("/x")

    res = asyncio.run(main())
    assert res.status_code == 503 and res.headers["retry-after"] == "1"
    assert res.json() == {"error": {"code": "overloaded", "message": str(QueueFull(256))}}
