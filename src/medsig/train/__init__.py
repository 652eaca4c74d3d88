"""medsig.train: one training loop (accelerate) with pluggable objectives.

`train(config) -> Path` writes the output folder described in docs/architecture.md
("Training outputs"); `load_config` reads a YAML config with `key=value` overrides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medsig.train.config import TrainConfig, load_config

if TYPE_CHECKING:
    from pathlib import Path


def train(config: Any, **kwargs: Any) -> Path:
    """Train per `config` (TrainConfig, dict or YAML path); see `medsig.train.loop.train`."""
    from medsig.train.loop import train as _train

    return _train(config, **kwargs)


__all__ = ["TrainConfig", "load_config", "train"]
