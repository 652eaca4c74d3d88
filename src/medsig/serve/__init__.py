"""medsig.serve: an HTTP API and a web page over a trained model and an index.

`create_app(model=DIR, store=PATH|URL, collection=NAME, settings=ServeSettings(...))` returns
a FastAPI app; `medsig serve` runs it with uvicorn. See docs/serving.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medsig.serve.app import create_app
    from medsig.serve.state import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: importing medsig.serve stays cheap
    if name == "create_app":
        from medsig.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from medsig.serve.state import ServeSettings

        return ServeSettings
    raise AttributeError(name)
