"""Zero-shot classification from label prompts with an image-text encoder.

Each class gets prompts (the spec's templates that use only that label, else generic ones);
their L2-normalised text embeddings are averaged (prompt ensembling). Logits are the model's
own ``scale * cos + bias``; probabilities are a softmax over the classes of a binary or
multiclass label, and a per-class sigmoid for multilabel SigLIP (softmax for CLIP, which has
no calibrated bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsig.data.text import template_fields

GENERIC_TEMPLATES = ("A medical image showing {}.", "A clinical photo of {}.")


def class_prompts(collection: Any, labels: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """{label: {class: [prompts]}} from the spec templates that use only that label."""
    out: dict[str, dict[str, list[str]]] = {}
    templates = list(collection.spec.templates)
    for name in labels:
        lab = collection.labels[name]
        column = next((spec.column for spec in collection.spec.labels if spec.name == name),
                      None)
        keys = {name} | ({column} if column else set())
        own = [t for t in templates if len(template_fields(t)) == 1
               and template_fields(t)[0] in keys]
        out[name] = {}
        for c in lab.classes:
            if own:
                out[name][c] = [t.format(**{template_fields(t)[0]: c}) for t in own]
            else:
                out[name][c] = [t.format(c) for t in GENERIC_TEMPLATES]
    return out


def class_embeddings(encoder: Any, prompts: dict[str, list[str]]) -> torch.Tensor:
    """(C, D) prompt-ensembled, re-normalised text embeddings, in the order of ``prompts``."""
    rows = []
    for texts in prompts.values():
        emb = encoder.embed_texts(list(texts))
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def scale_bias(encoder: Any) -> tuple[float, float]:
    scale = encoder.logit_scale
    bias = encoder.logit_bias
    s = float(scale.detach().float().exp()) if scale is not None else 100.0
    b = float(bias.detach().float().reshape(-1)[0]) if bias is not None else 0.0
    return s, b


def class_probabilities(image_emb: Any, class_emb: Any, kind: str, scale: float,
                        bias: float, sigmoid: bool) -> np.ndarray:
    """(n, C) class probabilities of L2-normalised image embeddings."""
    img = F.normalize(torch.as_tensor(np.asarray(image_emb), dtype=torch.float32), dim=-1)
    cls = F.normalize(torch.as_tensor(np.asarray(class_emb), dtype=torch.float32), dim=-1)
    logits = scale * img @ cls.T + bias
    if kind == "multilabel" and sigmoid:
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=1).numpy()


def head_outputs(kind: str, class_probs: np.ndarray) -> np.ndarray:
    """A head's outputs from class probabilities: binary keeps P(positive) only."""
    return class_probs[:, 1:2] if kind == "binary" else class_probs


def zeroshot_probabilities(encoder: Any, collection: Any, label: str,
                           image_emb: Any = None,
                           prompts: dict[str, list[str]] | None = None) -> np.ndarray:
    """(n, C) zero-shot class probabilities of every image of ``collection`` for ``label``
    (binary: C = 2, [negative, positive]). ``image_emb`` skips re-embedding the images."""
    if image_emb is None:
        from medsig.models.embedding import embed_arrays

        image_emb, _, _, _ = embed_arrays(encoder, collection, texts=False)
    prompts = prompts or class_prompts(collection, [label])[label]
    kind = collection.labels[label].kind
    scale, bias = scale_bias(encoder)
    return class_probabilities(image_emb, class_embeddings(encoder, prompts), kind, scale,
                               bias, sigmoid=encoder.kind == "siglip")
