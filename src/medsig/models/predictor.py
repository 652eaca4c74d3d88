"""Load any medsig output (or an image-text checkpoint) as a ``Predictor``.

- ``classify``: the transformers image classifier; its logits are every head concatenated;
- ``probe``: the base encoder + the probe in ``probe.safetensors``;
- ``contrastive`` or a plain image-text checkpoint: zero-shot from the saved prompts (or the
  prompts of a spec given with ``spec=``).

``predict_pixels(pixels) -> (n, K)`` probabilities laid out as the heads of ``medsig.json``
(binary: P(positive); multilabel: one sigmoid per class; multiclass: a softmax slice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsig.errors import ConfigError
from medsig.models.encoder import Encoder

PROBE_WEIGHTS = "probe.safetensors"


class ProbeNet(nn.Module):
    """Standardise → linear (logistic probe) or → hidden → ReLU → dropout → linear (MLP)."""

    def __init__(self, dim: int, outputs: int, hidden: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, outputs))
        else:
            self.net = nn.Sequential(nn.Linear(dim, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def head_probabilities(logits: torch.Tensor, heads: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Sigmoid for binary / multilabel outputs, softmax over each multiclass slice."""
    probs = torch.sigmoid(logits.float())
    for h in heads:
        if h["kind"] == "multiclass":
            cols = slice(int(h["offset"]), int(h["offset"]) + int(h["size"]))
            probs[:, cols] = torch.softmax(logits[:, cols].float(), dim=1)
    return probs


class Predictor:
    """Probabilities per head for preprocessed pixels, plus image embeddings."""

    def __init__(self, name: str, version: str, meta: dict[str, Any], encoder: Encoder,
                 heads: list[dict[str, Any]], forward: Any, from_embeddings: Any = None
                 ) -> None:
        self.name, self.version, self.meta = name, version, meta
        self.encoder, self.heads, self._forward = encoder, heads, forward
        self._from_embeddings = from_embeddings
        self.preprocess = encoder.preprocess
        self.image_size = encoder.image_size
        self.objective = str(meta.get("objective", "zeroshot"))

    @torch.inference_mode()
    def predict_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, sum(int(h["size"]) for h in self.heads)), np.float32)
        return self._forward(pixels).float().cpu().numpy()

    @property
    def uses_embeddings(self) -> bool:
        """True when predictions are a function of ``embed`` (probe, zero-shot)."""
        return self._from_embeddings is not None

    @torch.inference_mode()
    def predict_embeddings(self, emb: Any) -> np.ndarray:
        """Probabilities from image embeddings already computed with ``self.encoder``."""
        if self._from_embeddings is None:
            raise ConfigError(f"{self.objective} predictions need pixels, not embeddings")
        x = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
        return self._from_embeddings(x).float().cpu().numpy()

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings (the encoder the predictions come from)."""
        return self.encoder.embed_images(pixels).numpy()

    def decide(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per-label decisions for one image's probability row (see medsig.serve.summary)."""
        from medsig.serve.summary import decide, heads_of

        return [r.model_dump() for r in decide(heads_of(self.heads), probs)]

    def __repr__(self) -> str:
        labels = ", ".join(h["name"] for h in self.heads)
        return f"Predictor({self.name!r}, {self.objective}, labels=[{labels}])"


def _version(folder: Path | None, meta: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    if folder is not None:
        for weights in sorted(folder.glob("*.safetensors"))[:2]:
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}".encode())
    return f"{meta.get('medsig_version', '0')}+{digest.hexdigest()[:10]}"


def load_predictor(model: str | Path, device: str | None = None, spec: str | Path | None = None,
                   labels: Sequence[str] | None = None) -> Predictor:
    """A Predictor for a medsig output folder, or zero-shot for an image-text checkpoint."""
    folder = Path(model) if Path(model).is_dir() else None
    meta_path = folder / "medsig.json" if folder is not None else None
    meta: dict[str, Any] = {}
    if meta_path is not None and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable medsig.json: {exc}", file=meta_path) from None
    objective = meta.get("objective")
    name = str(meta.get("name") or (folder.name if folder is not None else model))
    version = _version(folder, meta)
    if objective == "classify":
        return _classifier(str(model), device, meta, name, version)
    if objective == "probe":
        return _probe(folder, device, meta, name, version)  # type: ignore[arg-type]
    return _zeroshot(str(model), device, meta, name, version, spec, labels)


def _classifier(model: str, device: str | None, meta: dict, name: str, version: str
                ) -> Predictor:
    encoder = Encoder.load(model, device=device, preprocess=meta.get("preprocess"))
    heads = list(meta["heads"])

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(encoder.device, encoder.dtype)
        return head_probabilities(encoder.model(pixel_values=pixels).logits, heads)

    return Predictor(name, version, meta, encoder, heads, forward)


def load_probe(folder: Path, meta: dict[str, Any]) -> ProbeNet:
    from safetensors.torch import load_file

    info = meta.get("probe") or {}
    path = folder / PROBE_WEIGHTS
    if not path.is_file():
        raise ConfigError("the probe weights are missing", file=path)
    state = load_file(str(path))
    net = ProbeNet(int(info["dim"]), int(info["outputs"]), info.get("hidden") or None,
                   float(info.get("dropout", 0.0)))
    net.load_state_dict(state)
    return net.eval()


def _probe(folder: Path, device: str | None, meta: dict, name: str, version: str
           ) -> Predictor:
    base = str(meta.get("encoder") or meta.get("base_model"))
    if not Path(base).exists() and (folder / base).exists():
        base = str(folder / base)
    encoder = Encoder.load(base, device=device, preprocess=meta.get("preprocess"))
    net = load_probe(folder, meta).to(encoder.device)
    heads = list(meta["heads"])

    def from_embeddings(emb: torch.Tensor) -> torch.Tensor:
        return head_probabilities(net(emb.to(encoder.device)), heads)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return from_embeddings(encoder.embed_images(pixels))

    return Predictor(name, version, meta, encoder, heads, forward, from_embeddings)


def _zeroshot(model: str, device: str | None, meta: dict, name: str, version: str,
              spec: str | Path | None, labels: Sequence[str] | None) -> Predictor:
    from medsig.models.zeroshot import (
        class_embeddings,
        class_probabilities,
        class_prompts,
        head_outputs,
        scale_bias,
    )

    encoder = Encoder.load(model, device=device, preprocess=meta.get("preprocess"))
    if encoder.tokenizer is None:
        raise ConfigError(f"'{model}' is image-only and has no medsig.json heads: train a "
                          "probe or a classifier on it first")
    prompts: dict[str, dict[str, list[str]]] = dict(meta.get("prompts") or {})
    heads = [dict(h) for h in meta.get("heads") or []]
    if spec is not None or not prompts:
        if spec is None:
            raise ConfigError(f"'{model}' has no saved labels: pass a dataset spec for "
                              "zero-shot labels")
        from medsig.data.collection import load_collection

        collection = load_collection(spec)
        names = list(labels or collection.labels)
        prompts = class_prompts(collection, names)
        heads, offset = [], 0
        for label in names:
            lab = collection.labels[label]
            size = 1 if lab.kind == "binary" else len(lab.classes)
            heads.append({"name": label, "kind": lab.kind, "classes": list(lab.classes),
                          "offset": offset, "size": size, "thresholds": None,
                          "threshold_rule": None})
            offset += size
    class_emb = {h["name"]: class_embeddings(encoder, prompts[h["name"]]) for h in heads}
    scale, bias = scale_bias(encoder)
    sigmoid = encoder.kind == "siglip"
    meta = {**meta, "objective": meta.get("objective", "zeroshot"), "prompts": prompts}

    def from_embeddings(emb: torch.Tensor) -> torch.Tensor:
        parts = [head_outputs(h["kind"], class_probabilities(emb, class_emb[h["name"]],
                                                             h["kind"], scale, bias, sigmoid))
                 for h in heads]
        return torch.as_tensor(np.concatenate(parts, axis=1))

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return from_embeddings(encoder.embed_images(pixels))

    return Predictor(name, version, meta, encoder, heads, forward, from_embeddings)
