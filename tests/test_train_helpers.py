"""Shared fixtures for the training tests: a split generated wound collection, tiny models."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

_CACHE: dict[str, Path] = {}
LABELS = ["urgency", "erythema", "infection_risk"]


def _cached(key: str, factory: Any, root: Path) -> Path:
    if key not in _CACHE or not _CACHE[key].exists():
        _CACHE[key] = factory(root)
    return _CACHE[key]


def make_wound(root: Path, n: int = 300) -> Path:
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize

    spec = synthesize("wound", root / "wound", n=n, seed=0, image_size=64)
    collection = load_collection(spec)
    write_split(collection, split_collection(collection, seed=0), spec.parent)
    set_spec_splits(spec, "splits.csv")
    return spec


def make_tiny(root: Path, arch: str = "siglip") -> Path:
    """A tiny random checkpoint whose logit scale / bias start as in the SigLIP paper
    (t' = log 10, b = -10): from HF's default (scale 1, bias 0) a random model first
    collapses its text embeddings instead of aligning them."""
    from transformers import AutoModel

    from medsig.models.tiny import write_tiny

    path = write_tiny(root / f"tiny-{arch}", arch=arch, image_size=32, seed=0)
    model = AutoModel.from_pretrained(path)
    if getattr(model, "logit_bias", None) is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session", name="wound")
def wound_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cached("wound", make_wound, tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="session", name="tiny")
def tiny_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cached("tiny", make_tiny, tmp_path_factory.mktemp("train-model"))


def no_label_spec(spec: Path, out: Path) -> Path:
    """The same table, images and split, described by a spec without labels."""
    raw = yaml.safe_load(spec.read_text())
    raw.pop("labels", None)
    for key in ("table", "image_root", "splits"):
        raw[key] = str(spec.parent / raw.get(key, "."))
    path = out / "nolabels.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def templated_spec(spec: Path, out: Path) -> Path:
    """The same rows with texts from one template over two visible findings (no free-text
    descriptions): image -> text retrieval then measures what the images show."""
    raw = yaml.safe_load(spec.read_text())
    raw["columns"].pop("text", None)
    raw["templates"] = ["A surgical wound, {healing}, with {erythema}."]
    for key in ("table", "image_root", "splits"):
        raw[key] = str(spec.parent / raw.get(key, "."))
    path = out / "templated.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def config(spec: Path, model: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast config; keyword arguments deep-merge into it."""
    base: dict[str, Any] = {
        "spec": str(spec), "model": str(model), "out": str(out), "objective": "contrastive",
        "labels": list(LABELS), "seed": 0, "precision": "fp32", "device": "cpu",
        "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.1},
        "data": {"augment": False},
        # the loop tests skip fitting the safe outputs (tests/test_folders.py, test_serve_safe)
        "eval": {"safe_outputs": False},
    }
    merged = copy.deepcopy(base)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def zero_gradient(name: str) -> bool:
    """Parameters whose gradient is exactly zero in exact arithmetic: attention key biases
    (softmax over keys ignores the constant q.b_k). Float rounding leaves ~1e-9 there, and
    AdamW's first steps (update ~ lr * g / (|g| + eps)) turn that noise into updates of up
    to lr, in either direction, so they cannot be compared between two summation orders."""
    return name.endswith("k_proj.bias") or name.endswith("in_proj_bias")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        atol: float = 1e-5) -> None:
    """Equal weights within `atol`, but for the zero-gradient ones (see `zero_gradient`)."""
    assert a.keys() == b.keys()
    for k in a:
        if zero_gradient(k):
            continue
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
