"""Where a head's score came from: Grad-CAM on the last block of the vision transformer.

The patch tokens leaving the last encoder layer form a (grid x grid) feature map ``A``; the
weights are the spatially averaged gradients of the head's score ``s`` with respect to it,
and the map is ``relu(sum_c w_c A_c)`` (Selvaraju et al. 2017), upsampled to the image.
The score is the decided output's probability: binary P(positive state), multiclass the
argmax class, multilabel the highest class. Works for classify and probe models (and any
``score_fn`` of pixels); zero-shot heads have no differentiable path here (returns None).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from io import BytesIO
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsig.data.patches import Patches, model_inputs
from medsig.models.heads import Head


def last_block(model: Any) -> torch.nn.Module | None:
    """The last transformer layer of a (vision) model, or None."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "vit.encoder.layer",
                 "encoder.layer", "base_model.vision_model.encoder.layers"):
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            return mod[-1]
    return None


def score_function(predictor: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pixels -> (n, K) raw head probabilities, differentiable; None for zero-shot."""
    enc = predictor.encoder
    objective = getattr(predictor, "objective", "")
    heads = predictor.heads
    if objective == "classify":
        from medsig.models.heads import head_probabilities

        return lambda px: head_probabilities(
            enc.model(**model_inputs(px.to(enc.device, enc.dtype))).logits, heads)
    if objective == "probe" and predictor._from_embeddings is not None:
        return lambda px: predictor._from_embeddings(F.normalize(
            enc.image_features(px).float(), dim=-1))
    return None


def target_column(head: Any, probs_row: np.ndarray) -> int:
    h = Head.of(head)
    if h.kind == "binary":
        return h.offset
    return h.offset + int(np.argmax(np.asarray(probs_row)[h.cols]))


def grad_cam(predictor: Any, pixels: torch.Tensor, column: int) -> np.ndarray | None:
    """(H, W) map in [0, 1] for one image ``pixels`` (3, H, W) and output ``column``."""
    fn = score_function(predictor)
    block = last_block(predictor.encoder.model)
    if fn is None or block is None or isinstance(pixels, Patches):  # NaFlex: not yet
        return None
    kept: dict[str, torch.Tensor] = {}

    def hook(_: Any, __: Any, out: Any) -> None:
        kept["a"] = out[0] if isinstance(out, tuple) else out

    handle = block.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            score = fn(pixels[None])[0, column]
            (grad,) = torch.autograd.grad(score, kept["a"])
    finally:
        handle.remove()
    act, grad = kept["a"][0].float(), grad[0].float()  # (tokens, dim)
    side = int(math.isqrt(act.shape[0]))
    extra = act.shape[0] - side * side  # a CLS token first (CLIP / ViT)
    act, grad = act[extra:], grad[extra:]
    cam = F.relu((act * grad.mean(dim=0)).sum(dim=1)).reshape(1, 1, side, side)
    cam = cam.detach()
    cam = F.interpolate(cam, size=tuple(pixels.shape[-2:]), mode="bilinear",
                        align_corners=False)[0, 0]
    top = float(cam.max())
    return (cam / top).detach().cpu().numpy() if top > 0 else cam.detach().cpu().numpy()


def overlay_png(pixels: torch.Tensor, cam: np.ndarray, preprocess: Any) -> str:
    """Base64 PNG: the (de-normalised) model input with the map as a translucent heat map."""
    from matplotlib import colormaps
    from PIL import Image

    mean = np.asarray(getattr(preprocess, "mean", [0.5] * 3), np.float32).reshape(-1, 1, 1)
    std = np.asarray(getattr(preprocess, "std", [0.5] * 3), np.float32).reshape(-1, 1, 1)
    img = np.clip(pixels.detach().float().cpu().numpy() * std + mean, 0, 1).transpose(1, 2, 0)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    a = 0.45 * np.clip(cam, 0, 1)[..., None]
    rgb = ((1 - a) * img + a * heat) * 255
    out = BytesIO()
    Image.fromarray(rgb.round().astype(np.uint8)).save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode("ascii")


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass that falls inside a boolean mask of the same size."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0
