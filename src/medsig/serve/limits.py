"""Backpressure: at most N HTTP requests in progress; beyond, an immediate 503.

Each request in progress holds its body (up to the upload limit) and decoded pixels, so the
number in progress bounds the server's memory. A refused request gets a JSON error body and
``Retry-After`` at once, without its body being read. ``/health`` is never refused.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

RETRY_AFTER_S = 1


def busy_body(message: str) -> bytes:
    return json.dumps({"error": {"code": "overloaded", "message": message}}).encode()


class ConcurrencyLimit:
    """ASGI middleware refusing HTTP requests beyond ``limit`` in progress (503)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ("/health",)
                 ) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be >= 1")
        self.app, self.limit, self.exempt = app, limit, exempt
        self.active = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self.refused += 1
            body = busy_body(f"server busy: {self.active} requests in progress (limit "
                             f"{self.limit}); retry in {RETRY_AFTER_S} s")
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after",
                                                         str(RETRY_AFTER_S).encode()),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
