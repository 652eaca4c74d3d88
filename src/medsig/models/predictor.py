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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsig.data.patches import model_inputs
from medsig.errors import ConfigError
from medsig.models.artifact import Artifact
from medsig.models.encoder import Encoder
from medsig.models.heads import Head, decide, head_probabilities, heads_for, total_outputs

PROBE_WEIGHTS = "probe.safetensors"


class ProbeNet(nn.Module):
    """Standardise → linear (logistic probe) or → (hidden → ReLU → dropout) per hidden
    width → linear (MLP, e.g. 1152 → 512 → 256 → 6)."""

    def __init__(self, dim: int, outputs: int, hidden: int | Sequence[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        widths = [hidden] if isinstance(hidden, int) else list(hidden or [])
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(dim, int(width)), nn.ReLU(), nn.Dropout(dropout)]
            dim = int(width)
        self.net = nn.Sequential(*layers, nn.Linear(dim, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Predictor:
    """Probabilities per head for preprocessed pixels, plus image embeddings."""

    def __init__(self, name: str, version: str, artifact: Artifact, encoder: Encoder,
                 heads: list[Head], forward: Any, from_embeddings: Any = None) -> None:
        self.name, self.version, self.artifact = name, version, artifact
        self.encoder, self.heads, self._forward = encoder, list(heads), forward
        self._from_embeddings = from_embeddings
        self.probe_net: nn.Module | None = None  # probe: embeddings -> logits (saliency)
        self.preprocess = encoder.preprocess
        self.image_size = encoder.image_size
        self.objective = artifact.objective
        self.kind = artifact.kind
        self.folder: Path | None = None  # the model folder, when loaded from one
        self.safety: Any = None  # medsig.models.safety.Safety, attached by load_predictor

    def _calibrated(self, probs: np.ndarray) -> np.ndarray:
        return probs if self.safety is None else self.safety.calibrate(self.heads, probs)

    @property
    def meta(self) -> dict[str, Any]:
        """The model folder's record as a medsig.json dict."""
        return self.artifact.to_dict()

    @torch.inference_mode()
    def raw_probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Head probabilities before calibration."""
        if len(pixels) == 0:
            return np.zeros((0, total_outputs(self.heads)), np.float32)
        return self._forward(pixels).float().cpu().numpy()

    def predict_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Head probabilities (calibrated when the folder has temperatures)."""
        return self._calibrated(self.raw_probabilities(pixels))

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
        return self._calibrated(self._from_embeddings(x).float().cpu().numpy())

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings (the encoder the predictions come from)."""
        return self.encoder.embed_images(pixels).numpy()

    def decide(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per-label decisions for one image's probability row (``medsig.models.heads``)."""
        return [d.to_dict() for d in decide(self.heads, probs)]

    def __repr__(self) -> str:
        labels = ", ".join(h.name for h in self.heads)
        return f"Predictor({self.name!r}, {self.objective}, labels=[{labels}])"


def _version(folder: Path | None, meta: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    if folder is not None:
        for weights in sorted(folder.glob("*.safetensors"))[:2]:
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}".encode())
    return f"{meta.get('medsig_version', '0')}+{digest.hexdigest()[:10]}"


def load_encoder(model: str | Path, device: str | None = None,
                 artifact: Artifact | None = None) -> Encoder:
    """The encoder of a model folder (any kind, also a LoRA adapter) or a hub id, with the
    preprocessing its medsig.json records (what training used)."""
    folder = Path(model) if Path(model).is_dir() else None
    if artifact is None and folder is not None:
        artifact = Artifact.find(folder)
    if artifact is None:
        return Encoder.load(str(model), device=device)
    source = artifact.encoder_source(folder) if folder is not None else str(model)
    encoder = Encoder.load(source, device=device, preprocess=artifact.preprocessing.mode,
                           max_num_patches=artifact.preprocessing.max_num_patches)
    if artifact.preprocessing.size is not None and artifact.preprocessing.mode != "processor":
        encoder.preprocess = artifact.preprocessing.build(encoder.image_processor)
        encoder.image_size = int(encoder.preprocess.size)
    return encoder


def load_predictor(model: str | Path, device: str | None = None, spec: str | Path | None = None,
                   labels: Sequence[str] | None = None, safe_outputs: bool = True) -> Predictor:
    """A Predictor for a medsig model folder of any kind, or zero-shot for an image-text
    checkpoint (hub id or folder) with a dataset spec. ``safe_outputs``: apply the folder's
    calibration and attach its conformal / OOD data (``medsig.models.safety``)."""
    folder = Path(model) if Path(model).is_dir() else None
    artifact = Artifact.find(folder) if folder is not None else None
    if artifact is None:
        artifact = Artifact("zeroshot", base_model=str(model), adaptation="frozen",
                            versions={})
    name = str(artifact.name or (folder.resolve().name if folder is not None else model))
    version = _version(folder, artifact.to_dict())
    encoder = load_encoder(model, device, artifact if folder is not None else None)
    if artifact.objective == "classify":
        predictor = _classifier(encoder, artifact, name, version)
    elif artifact.objective == "probe":
        predictor = _probe(folder, encoder, artifact, name, version)  # type: ignore[arg-type]
    else:
        predictor = _zeroshot(str(model), encoder, artifact, name, version, spec, labels)
    predictor.folder = folder.resolve() if folder is not None else None
    if safe_outputs and spec is None and labels is None:  # they belong to the saved heads
        from medsig.models.safety import load_safety

        predictor.safety = load_safety(artifact, folder)
        if predictor.safety is not None:
            predictor.heads = predictor.safety.calibrated_heads(predictor.heads)
    return predictor


def _classifier(encoder: Encoder, artifact: Artifact, name: str, version: str) -> Predictor:
    heads = artifact.heads
    if not hasattr(encoder.model, "classifier"):
        raise ConfigError(f"'{name}': medsig.json says classify but the weights are not an "
                          "image classifier")

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(encoder.device, encoder.dtype)
        return head_probabilities(encoder.model(**model_inputs(pixels)).logits, heads)

    return Predictor(name, version, artifact, encoder, heads, forward)


def load_probe(folder: Path, artifact: Artifact) -> ProbeNet:
    from safetensors.torch import load_file

    info = artifact.probe or {}
    path = folder / PROBE_WEIGHTS
    if not path.is_file():
        raise ConfigError("the probe weights are missing", file=path)
    state = load_file(str(path))
    net = ProbeNet(int(info["dim"]), int(info["outputs"]), info.get("hidden") or None,
                   float(info.get("dropout", 0.0)))
    net.load_state_dict(state)
    return net.eval()


def _probe(folder: Path, encoder: Encoder, artifact: Artifact, name: str, version: str
           ) -> Predictor:
    net = load_probe(folder, artifact).to(encoder.device)
    heads = artifact.heads

    def from_embeddings(emb: torch.Tensor) -> torch.Tensor:
        return head_probabilities(net(emb.to(encoder.device)), heads)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return from_embeddings(encoder.embed_images(pixels))

    predictor = Predictor(name, version, artifact, encoder, heads, forward, from_embeddings)
    predictor.probe_net = net
    return predictor


def _zeroshot(model: str, encoder: Encoder, artifact: Artifact, name: str, version: str,
              spec: str | Path | None, labels: Sequence[str] | None) -> Predictor:
    from medsig.models.zeroshot import (
        class_embeddings,
        class_probabilities,
        class_prompts,
        head_outputs,
        scale_bias,
    )

    if encoder.tokenizer is None:
        raise ConfigError(f"'{model}' is image-only and has no medsig.json heads: train a "
                          "probe or a classifier on it first")
    prompts = dict(artifact.prompts)
    heads = list(artifact.heads)
    if spec is not None or not prompts:
        if spec is None:
            raise ConfigError(f"'{model}' has no saved labels: pass a dataset spec for "
                              "zero-shot labels")
        from medsig.data.collection import load_collection

        collection = load_collection(spec)
        names = list(labels or collection.labels)
        prompts = class_prompts(collection, names)
        heads = [Head.of(h.to_dict()) for h in heads_for(collection.labels[n] for n in names)]
    class_emb = {h.name: class_embeddings(encoder, prompts[h.name]) for h in heads}
    scale, bias = scale_bias(encoder)
    sigmoid = encoder.kind == "siglip"
    artifact = replace(artifact, heads=heads, prompts=prompts)

    def from_embeddings(emb: torch.Tensor) -> torch.Tensor:
        parts = [head_outputs(h.kind, class_probabilities(emb, class_emb[h.name], h.kind,
                                                          scale, bias, sigmoid))
                 for h in heads]
        return torch.as_tensor(np.concatenate(parts, axis=1))

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return from_embeddings(encoder.embed_images(pixels))

    return Predictor(name, version, artifact, encoder, heads, forward, from_embeddings)
