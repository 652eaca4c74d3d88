"""Where a head's score came from: a saliency map per label, three methods.

Every method explains one output ``column`` through its *score*: the raw logit for binary
and multilabel outputs, the log-probability of the class for multiclass heads (scores
that do not saturate the way probabilities do).

- ``auto`` (the default, ``resolve_method``): occlusion on a GPU or for a small vision tower
  on a CPU, rollout for a large tower on a CPU (occlusion would take minutes there).
- ``occlusion`` (Zeiler & Fergus 2014): slide a window (1/8 of the side,
  stride 1/16: 225 positions) over the model input, fill it with the image's mean colour,
  and credit every pixel with the mean drop of the score over the windows covering it.
  Model-agnostic (classify, probe and zero-shot models alike), no gradients; it costs 225
  forward passes (batched), so it is slow for large encoders on a CPU.
- ``gradcam`` (Selvaraju et al. 2017): the patch tokens leaving the last vision block as a
  (grid x grid) feature map ``A``, weights the token-averaged gradients of the score,
  ``relu(sum_c w_c A_c)``. Models that read only a CLS token (CLIP's image features,
  ViT's classifier) give the last block's patch outputs no gradient; for them the block's
  *input* is used. One backward.
- ``rollout``: gradient-weighted attention rollout (Chefer et al. 2021): per layer the
  head-averaged ``relu(grad * attention)`` is rolled out, ``R <- R + A R``, and read out
  the way the model pools: the rows of ``R - I`` weighted by the norm of the score's
  gradient on each final token (the CLS token alone for CLIP / ViT heads that read it,
  every token for mean pooling, SigLIP's attention-pooling head in between).

bench/saliency.py measures the three against a random map (share of the map's mass inside
the finding's mask); occlusion is the one that points at the finding there. ``to_image``
maps a map on the model input back onto the original image (pad / resize / centre crop).

SigLIP 2 NaFlex inputs (``Patches``): the map has the image's own grid shape
``(rows * p, cols * p)``, not a square. Occlusion fills windows of k x k real patches on
that grid (k = 1/8 of the shorter side, at least 2; padding rows untouched); Grad-CAM and
rollout read the real tokens only, on the (rows, cols) grid of ``spatial_shapes``;
``overlay_png`` draws on the patches put back on their grid (``Patches.images``).
"""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsig.data.patches import Patches, model_inputs
from medsig.models.heads import Head, heads_of

METHODS = ("auto", "occlusion", "gradcam", "rollout")
DEFAULT_METHOD = "auto"
# "auto" takes occlusion (225 forward passes) on an accelerator or for a vision tower up to
# this many parameters on a CPU (tiny models: < 0.4 s a map); a larger tower on a CPU gets
# rollout (one backward: ~1 s for SigLIP-base-224, where occlusion took 76-112 s)
OCCLUSION_CPU_MAX_PARAMS = 30_000_000
_EAGER = threading.Lock()  # rollout switches the model to eager attention for a moment


def blocks(model: Any) -> torch.nn.ModuleList | None:
    """The transformer layers of the vision tower (a ModuleList of ``*Layer`` / ``*Block``
    modules, the one under ``vision`` where a model has a text tower too), or None."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod)
             and type(mod[0]).__name__.endswith(("Layer", "Block"))]
    vision = [mod for name, mod in found if "vision" in name]
    return (vision or [mod for _, mod in found] or [None])[0]


def last_block(model: Any) -> torch.nn.Module | None:
    """The last transformer layer of a (vision) model, or None."""
    layers = blocks(model)
    return None if layers is None else layers[-1]


def head_logits(predictor: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pixels -> (n, K) raw head outputs (before sigmoid / softmax), differentiable; None
    where there is no differentiable path (zero-shot)."""
    enc = predictor.encoder
    objective = getattr(predictor, "objective", "")
    if objective == "classify":
        return lambda px: enc.model(**model_inputs(px.to(enc.device, enc.dtype))).logits.float()
    net = getattr(predictor, "probe_net", None)
    if objective == "probe" and net is not None:
        return lambda px: net(F.normalize(enc.image_features(px.to(enc.device, enc.dtype))
                                          .float(), dim=-1))
    return None


def head_of(predictor: Any, column: int) -> Head:
    """The head that owns output ``column``."""
    for h in heads_of(predictor.heads):
        if h.offset <= column < h.offset + h.size:
            return h
    raise ValueError(f"output column {column} belongs to no head")


def score_function(predictor: Any, column: int, differentiable: bool = True
                   ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pixels -> (n,) score of output ``column``: the logit (binary / multilabel) or the
    class log-probability (multiclass). Without ``differentiable``, any predictor works
    (zero-shot scores come from its probabilities)."""
    head = head_of(predictor, column)
    logits = head_logits(predictor)
    if logits is None:
        return None if differentiable else _probability_score(predictor, head, column)
    if head.kind == "multiclass":
        return lambda px: torch.log_softmax(logits(px)[:, head.cols], dim=1)[
            :, column - head.offset]
    return lambda px: logits(px)[:, column]


def _probability_score(predictor: Any, head: Head, column: int
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same score from the predictor's probabilities (no gradients needed)."""
    def score(px: torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(predictor.raw_probabilities(px)[:, column], dtype=torch.float64)
        return p.clamp(min=1e-12).log() if head.kind == "multiclass" \
            else torch.logit(p, eps=1e-7)

    return score


def target_column(head: Any, probs_row: np.ndarray) -> int:
    """The decided output of a head: binary its positive state, else the most probable."""
    h = Head.of(head)
    if h.kind == "binary":
        return h.offset
    return h.offset + int(np.argmax(np.asarray(probs_row)[h.cols]))


def _normalised(cam: torch.Tensor) -> np.ndarray:
    cam = cam.detach().float().cpu()
    top = float(cam.max())
    return (cam / top if top > 0 else cam).numpy()


def _single(pixels: Patches) -> Patches:
    """One image's patches (``pixel_values`` (N, P)), from one image or a batch of one."""
    return pixels[0] if pixels.pixel_values.dim() == 3 else pixels


def _grid(pixels: Patches) -> tuple[int, int, int]:
    """(rows, cols, patch side) of one image's patches."""
    rows, cols = (int(v) for v in _single(pixels).spatial_shapes.tolist())
    return rows, cols, int(round((pixels.pixel_values.shape[-1] / 3) ** 0.5))


def _patch_tokens(tokens: torch.Tensor, pixels: Any) -> torch.Tensor:
    """The patch tokens of ``tokens`` (N, ...): NaFlex's real ones, else without a CLS token."""
    if isinstance(pixels, Patches):
        rows, cols, _ = _grid(pixels)
        return tokens[:rows * cols]
    return tokens[1:] if _has_cls(tokens) else tokens


def _token_map(tokens: torch.Tensor, pixels: Any) -> torch.Tensor:
    """Per-token values -> (H, W) on the model input, bilinear with pixel centres aligned
    (patch i covers pixels [i p, (i + 1) p)): the image's own (rows, cols) grid of real
    tokens for NaFlex patches, a square grid (a CLS token first dropped) for a tensor."""
    if isinstance(pixels, Patches):
        rows, cols, p = _grid(pixels)
        size = (rows * p, cols * p)
    else:
        rows = cols = int(math.isqrt(tokens.shape[0]))
        size = tuple(pixels.shape[-2:])
    grid = tokens[:rows * cols] if isinstance(pixels, Patches) else tokens[-rows * cols:]
    return F.interpolate(grid.reshape(1, 1, rows, cols).float(), size=size, mode="bilinear",
                         align_corners=False)[0, 0]


def saliency_map(predictor: Any, pixels: torch.Tensor, column: int,
                 method: str = DEFAULT_METHOD) -> np.ndarray | None:
    """(H, W) map in [0, 1] on the model input ``pixels`` (3, H, W) for output ``column``
    (NaFlex ``Patches``: (rows * p, cols * p)); None when ``method`` cannot explain this
    model (gradients of a zero-shot model)."""
    method = resolve_method(predictor, method)
    if isinstance(pixels, Patches):
        pixels = _single(pixels)
        if method == "occlusion":
            return patch_occlusion(predictor, pixels, column)
    if method == "occlusion":
        return occlusion(predictor, pixels, column)
    if method == "gradcam":
        return grad_cam(predictor, pixels, column)
    if method == "rollout":
        return rollout(predictor, pixels, column)
    raise ValueError(f"saliency method must be one of {METHODS}, not {method!r}")


def resolve_method(predictor: Any, method: str = DEFAULT_METHOD) -> str:
    """The method ``auto`` stands for with this predictor (others are returned as given)."""
    if method != "auto":
        return method
    enc = predictor.encoder
    if torch.device(enc.device).type != "cpu":
        return "occlusion"
    model = enc.model
    tower = getattr(model, "vision_model", None) or model
    size = sum(p.numel() for p in tower.parameters())
    return "occlusion" if size <= OCCLUSION_CPU_MAX_PARAMS else "rollout"


@torch.no_grad()
def occlusion(predictor: Any, pixels: torch.Tensor, column: int, window: int | None = None,
              stride: int | None = None, batch_size: int = 32) -> np.ndarray | None:
    """Mean drop of the score when a window (default 1/8 of the side, stride half of it)
    is filled with the image's mean colour, per pixel."""
    score = score_function(predictor, column, differentiable=False)
    if score is None:
        return None
    h, w = pixels.shape[-2:]
    window = window or max(1, min(h, w) // 8)
    stride = stride or max(1, window // 2)
    boxes = [(y, x) for y in _starts(h, window, stride) for x in _starts(w, window, stride)]
    fill = pixels.mean(dim=(1, 2), keepdim=True)
    base = float(score(pixels[None])[0])
    drops = []
    for i in range(0, len(boxes), batch_size):
        batch = pixels[None].repeat(len(boxes[i:i + batch_size]), 1, 1, 1)
        for b, (y, x) in enumerate(boxes[i:i + batch_size]):
            batch[b, :, y:y + window, x:x + window] = fill
        drops.append((base - score(batch).double().cpu()).clamp(min=0))
    return _normalised(_credited(torch.cat(drops), boxes, window, (h, w)))


@torch.no_grad()
def patch_occlusion(predictor: Any, pixels: Patches, column: int, window: int | None = None,
                    stride: int | None = None, batch_size: int = 32) -> np.ndarray | None:
    """Occlusion on one image's NaFlex patches: windows of ``window`` x ``window`` real
    patches on its own grid (default 1/8 of the shorter side, at least 2, stride half of
    it) filled with the image's mean colour; a (rows * p, cols * p) map."""
    score = score_function(predictor, column, differentiable=False)
    if score is None:
        return None
    one = _single(pixels)
    rows, cols, p = _grid(one)
    n, values = rows * cols, one.pixel_values
    window = window or min(rows, cols, max(2, min(rows, cols) // 8))
    stride = stride or max(1, window // 2)
    boxes = [(y, x) for y in _starts(rows, window, stride) for x in _starts(cols, window, stride)]
    fill = values[:n].unflatten(-1, (-1, 3)).mean(dim=(0, 1)).repeat(p * p)  # (p, p, 3) rows
    base = float(score(one[None])[0])
    drops = []
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = values[None].repeat(len(chunk), 1, 1)
        for b, (y, x) in enumerate(chunk):
            batch[b, :n].view(rows, cols, -1)[y:y + window, x:x + window] = fill
        masks, shapes = (t[None].repeat(len(chunk), 1)
                         for t in (one.pixel_attention_mask, one.spatial_shapes))
        drops.append((base - score(Patches(batch, masks, shapes)).double().cpu()).clamp(min=0))
    cam = _credited(torch.cat(drops), boxes, window, (rows, cols))
    return _normalised(cam.repeat_interleave(p, 0).repeat_interleave(p, 1))


def _credited(drops: torch.Tensor, boxes: list[tuple[int, int]], window: int,
              shape: tuple[int, int]) -> torch.Tensor:
    """Each cell credited with the mean drop of the windows covering it."""
    total, count = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape)
    for d, (y, x) in zip(drops, boxes):
        total[y:y + window, x:x + window] += d
        count[y:y + window, x:x + window] += 1
    return total / count.clamp(min=1)


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts that cover [0, length) (the last one flush with the end)."""
    starts = list(range(0, max(1, length - window + 1), stride))
    return starts if starts[-1] + window >= length else [*starts, length - window]


def grad_cam(predictor: Any, pixels: torch.Tensor, column: int) -> np.ndarray | None:
    """Grad-CAM of output ``column`` on the last vision block (its input for CLS models)."""
    score = score_function(predictor, column)
    block = last_block(predictor.encoder.model)
    if score is None or block is None:
        return None
    kept: dict[str, torch.Tensor] = {}

    def keep_in(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        kept["in"] = args[0] if args else kwargs["hidden_states"]

    def keep_out(_: Any, __: Any, out: Any) -> None:
        kept["out"] = out[0] if isinstance(out, tuple) else out

    handles = [block.register_forward_pre_hook(keep_in, with_kwargs=True),
               block.register_forward_hook(keep_out)]
    try:
        with torch.enable_grad():
            s = score(pixels[None])[0]
            g_in, g_out = torch.autograd.grad(s, [kept["in"], kept["out"]], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    act, grad = kept["out"][0], g_out
    if grad is None or not bool(grad[0, 1:].any()):  # a CLS-pooled model: patch outputs unused
        act, grad = kept["in"][0], g_in
    if grad is None:
        return None
    act = _patch_tokens(act.detach().float(), pixels)
    cam = F.relu((act * _patch_tokens(grad[0].float(), pixels).mean(dim=0)).sum(dim=1))
    return _normalised(_token_map(cam, pixels))


def _has_cls(tokens: torch.Tensor) -> bool:
    return tokens.shape[0] != math.isqrt(tokens.shape[0]) ** 2


@contextmanager
def _eager_attention(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The attention layers in eager mode (which returns the attention probabilities); the
    vision config is switched, not the whole model (no text-tower side effects)."""
    configs = list({id(m.config): m.config for m in modules
                    if getattr(m, "config", None) is not None}.values())
    with _EAGER:
        before = [c._attn_implementation for c in configs]
        try:
            for c in configs:
                c._attn_implementation = "eager"
            yield
        finally:
            for c, b in zip(configs, before):
                c._attn_implementation = b


def _attention_modules(layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """Per layer, the first submodule named like ``*Attention`` (returns output, probs)."""
    found = []
    for layer in layers:
        for name, sub in layer.named_modules():
            if name and type(sub).__name__.endswith("Attention"):
                found.append(sub)
                break
    return found


def rollout(predictor: Any, pixels: torch.Tensor, column: int) -> np.ndarray | None:
    """Gradient-weighted attention rollout (Chefer et al. 2021), read out as the model pools:
    each final token weighted by the norm of the score's gradient on it (the CLS token alone
    for CLIP / ViT, every token alike for mean pooling, SigLIP's attention-pooling head in
    between), without the identity path (which gives every token its own weight back)."""
    score = score_function(predictor, column)
    layers = blocks(predictor.encoder.model)
    if score is None or layers is None:
        return None
    probs: list[torch.Tensor] = []
    kept: dict[str, torch.Tensor] = {}
    mods = _attention_modules(layers)
    with _eager_attention(mods):
        handles = [m.register_forward_hook(lambda _, __, out: probs.append(out[1]))
                   for m in mods]
        handles.append(layers[-1].register_forward_hook(
            lambda _, __, out: kept.__setitem__("out", out[0] if isinstance(out, tuple)
                                                else out)))
        try:
            with torch.enable_grad():
                s = score(pixels[None])[0]
                if len(probs) != len(mods) or any(a is None for a in probs):
                    return None  # attention probabilities unavailable (fused kernel)
                *grads, g_out = torch.autograd.grad(s, [*probs, kept["out"]])
        finally:
            for handle in handles:
                handle.remove()
    n = probs[0].shape[-1]
    rel = torch.eye(n)
    for a, g in zip(probs, grads):
        rel = rel + (g[0].float() * a[0].detach().float()).clamp(min=0).mean(dim=0) @ rel
    weight = g_out[0].float().norm(dim=-1)
    weight = weight / weight.sum().clamp(min=1e-12)
    return _normalised(_token_map(weight @ (rel - torch.eye(n)), pixels))


def to_image(cam: np.ndarray, image_size: tuple[int, int], preprocess: Any) -> np.ndarray:
    """A (S, S) map on the model input -> (height, width) on the original image, undoing
    the preprocessing's geometry: pad-to-square, squash-resize or shortest-edge + centre
    crop (outside the crop: 0, the model did not see it); a NaFlex map (its own aspect,
    no crop) is resized."""
    w, h = image_size
    s = cam.shape[0]
    t = torch.as_tensor(np.asarray(cam, np.float32))[None, None]
    mode = getattr(preprocess, "mode", "resize")
    edge = getattr(preprocess, "shortest_edge", None)
    if mode == "pad":
        side = max(w, h)
        shrink = side * side > 2.0 * w * h  # elongated: shrunk first (transforms.pad_resize)
        inner = (max(1, round(w * s / side)), max(1, round(h * s / side))) if shrink else None
        full = s if shrink else side
        big = t if shrink else F.interpolate(t, size=(side, side), mode="bilinear",
                                             align_corners=False)
        iw, ih = inner or (w, h)
        x0, y0 = (full - iw) // 2, (full - ih) // 2
        crop = big[..., y0:y0 + ih, x0:x0 + iw]
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0] \
            .numpy()
    if mode in ("reference", "processor") and edge:
        from medsig.data.transforms import shortest_edge_size

        rw, rh = shortest_edge_size((w, h), edge)
        canvas = torch.zeros(1, 1, rh, rw)
        x0, y0 = max(0, (rw - s) // 2), max(0, (rh - s) // 2)
        canvas[..., y0:y0 + min(s, rh), x0:x0 + min(s, rw)] = t[..., :min(s, rh), :min(s, rw)]
        t = canvas
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay_png(pixels: torch.Tensor | Patches, cam: np.ndarray, preprocess: Any) -> str:
    """Base64 PNG: the (de-normalised) model input with the map as a translucent heat map
    (NaFlex patches: put back on the image's own grid)."""
    from matplotlib import colormaps
    from PIL import Image

    from medsig.data.transforms import to_uint8_image

    if isinstance(pixels, Patches):
        pixels = pixels.images()[0]
    img = to_uint8_image(pixels, preprocess).permute(1, 2, 0).numpy().astype(np.float32) / 255
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
