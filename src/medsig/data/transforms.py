"""Image transforms with PIL and torch only (no torchvision).

``Preprocess`` turns an RGB PIL image into a normalised ``(3, size, size)`` float tensor:

- ``reference`` (the default): the checkpoint's published pipeline, reproduced with PIL and
  numpy: the processor's resize (``size`` × ``size``, or CLIP's shortest edge + centre crop)
  with its resampling filter, or a family's own resize (``resize_method="tf_bilinear"``:
  MedSigLIP's notebooks), then rescale and normalise (docs/models.md, per family);
- ``pad`` (a deliberate difference, e.g. for wounds): zero-pad to a square, resize, normalise;
- ``resize``: resize straight to ``size × size`` with the processor's filter;
- ``processor``: call the checkpoint's own Hugging Face image processor.

``Augment`` is the training augmentation: random resized crop, horizontal flip, small
rotation and colour jitter, all driven by an explicit ``torch.Generator`` so that a resumed
run sees the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

MODES = ("reference", "pad", "resize", "processor")
RESIZE_METHODS = ("pil", "tf_bilinear")
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC,
             4: Image.BOX, 5: Image.HAMMING}


MAX_PAD_RATIO = 2.0  # pad first only while the canvas is at most twice the image


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_resize(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Zero-pad to a square and resize to ``size`` x ``size`` without a huge canvas.

    Ordinary images (canvas at most ``MAX_PAD_RATIO`` times the image: aspect up to 2:1)
    are padded then resized, exactly as :func:`pad_to_square`. An elongated image (a
    1 x 20,000 strip would need a 20,000² canvas) is resized first, its long side to
    ``size``, then centred on a ``size``² canvas: memory stays within the image's own.
    """
    w, h = image.size
    side = max(w, h)
    if side * side <= MAX_PAD_RATIO * w * h:
        image = pad_to_square(image)
        return image if image.size == (size, size) else image.resize((size, size), resample)
    scale = size / side
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image.convert("RGB").resize((nw, nh), resample),
                 ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _bounded_square(image: Image.Image, size: int) -> Image.Image:
    """Zero-padded to a square; an elongated image is first shrunk (long side ``size``), so
    the canvas never exceeds ``MAX_PAD_RATIO`` times the image (see :func:`pad_resize`)."""
    w, h = image.size
    side = max(w, h)
    if side * side > MAX_PAD_RATIO * w * h and side > size:
        scale = size / side
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.BILINEAR)
    return pad_to_square(image)


class Preprocess:
    """PIL RGB image → normalised ``(3, size, size)`` float32 tensor."""

    def __init__(self, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), mode: str = "pad",
                 resample: int = Image.BICUBIC, processor: Any = None,
                 resize_method: str = "pil", shortest_edge: int | None = None,
                 rescale: float = 1 / 255) -> None:
        if mode not in MODES:
            raise ValueError(f"preprocess mode must be one of {MODES}, not {mode!r}")
        if resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize method must be one of {RESIZE_METHODS}, "
                             f"not {resize_method!r}")
        if mode == "processor" and processor is None:
            raise ValueError("preprocess mode 'processor' needs the image processor")
        self.size, self.mode, self.resample, self.processor = int(size), mode, resample, processor
        self.resize_method, self.rescale = resize_method, float(rescale)
        self.shortest_edge = int(shortest_edge) if shortest_edge else None
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_processor(cls, processor: Any, mode: str = "reference",
                       resize_method: str = "pil") -> Preprocess:
        """Size, mean, std, resampling (and CLIP's shortest edge) of an HF image processor."""
        size = _processor_size(processor)
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
        resample = getattr(processor, "resample", None)
        resample = _RESAMPLE.get(int(resample), Image.BICUBIC) if resample is not None \
            else Image.BICUBIC
        rescale = getattr(processor, "rescale_factor", None) or 1 / 255
        return cls(size, mean, std, mode=mode, resample=resample,
                   processor=processor if mode == "processor" else None,
                   resize_method=resize_method, shortest_edge=_shortest_edge(processor),
                   rescale=rescale)

    def describe(self) -> dict[str, Any]:
        """What this pipeline does, as JSON (recorded in a model folder)."""
        return {"mode": self.mode, "size": self.size, "resize_method": self.resize_method,
                "resample": int(self.resample), "shortest_edge": self.shortest_edge,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.mode == "processor":
            out = self.processor(images=image.convert("RGB"), return_tensors="pt")
            return out["pixel_values"][0].float()
        return self.normalize(self.to_uint8(image))

    @property
    def splits(self) -> bool:
        """Whether ``to_uint8`` + ``normalize`` (CPU decode, normalise on the device) apply."""
        return self.mode != "processor"

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """Pad / resize only: a ``(3, size, size)`` uint8 tensor (what CPU workers ship)."""
        if self.mode == "pad":
            if self.resize_method == "pil":  # elongated images never build a huge canvas
                array = np.asarray(pad_resize(image, self.size, self.resample).convert("RGB"))
                return torch.from_numpy(array.copy()).permute(2, 0, 1)
            image = _bounded_square(image, self.size)
        array = np.ascontiguousarray(self._resized(image.convert("RGB")))
        if not array.flags.writeable:  # a view of PIL's buffer: torch wants its own memory
            array = array.copy()
        return torch.from_numpy(array).permute(2, 0, 1)

    def _resized(self, image: Image.Image) -> np.ndarray:
        """uint8 ``(size, size, 3)``: the pipeline's resize (and centre crop)."""
        if self.resize_method == "tf_bilinear":
            return tf_bilinear_resize(np.asarray(image), (self.size, self.size))
        if self.mode == "reference" and self.shortest_edge:
            image = image.resize(shortest_edge_size(image.size, self.shortest_edge),
                                 self.resample)
            return center_crop(np.asarray(image), self.size)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        return np.asarray(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, s, s)`` on any device -> normalised float32 on that device."""
        mean, std = mean_std_on(self, pixels.device)
        return (pixels.float().mul_(self.rescale) - mean) / std

    def __getstate__(self) -> dict[str, Any]:  # data workers get no device tensors
        return {**self.__dict__, "_on_device": {}}

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, mode={self.mode!r})"


def mean_std_on(preprocess: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess``'s normalisation mean and std on ``device``: copied to an accelerator
    once (cached in its ``_on_device``, which data workers do not get), not every batch."""
    if device.type == "cpu":
        return preprocess.mean, preprocess.std
    key = str(device)
    if key not in preprocess._on_device:
        preprocess._on_device[key] = (preprocess.mean.to(device), preprocess.std.to(device))
    return preprocess._on_device[key]


def to_uint8_image(pixels: torch.Tensor, preprocess: Any) -> torch.Tensor:
    """The inverse of ``normalize`` for one ``(3, h, w)`` image: uint8 on the CPU (uint8
    input as it is), with ``preprocess``'s mean, std and rescale (0.5, 0.5, 1/255 if absent)."""
    x = pixels.detach().cpu()
    if x.dtype == torch.uint8:
        return x
    mean = torch.as_tensor(getattr(preprocess, "mean", (0.5,) * 3), dtype=torch.float32)
    std = torch.as_tensor(getattr(preprocess, "std", (0.5,) * 3), dtype=torch.float32)
    scale = float(getattr(preprocess, "rescale", 1 / 255))
    restored = (x.float() * std.cpu().reshape(3, 1, 1) + mean.cpu().reshape(3, 1, 1)) / scale
    return restored.round().clamp(0, 255).to(torch.uint8)


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """(width, height) with the short side ``edge`` and the long side truncated to int (HF)."""
    w, h = size
    if w <= h:
        return edge, int(edge * h / w)
    return int(edge * w / h), edge


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size`` × ``size`` crop (offsets rounded down, as transformers does)."""
    h, w = array.shape[:2]
    if h < size or w < size:  # smaller than the crop: pad with zeros, centred
        out = np.zeros((max(h, size), max(w, size), array.shape[2]), dtype=array.dtype)
        top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
        out[top:top + h, left:left + w] = array
        array, h, w = out, out.shape[0], out.shape[1]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top:top + size, left:left + size]


def tf_bilinear_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(method="bilinear", antialias=False)`` then ``astype(uint8)``.

    Half-pixel centres (``src = (dst + 0.5) * in / out - 0.5``, neighbours clamped to the
    edge), interpolated in float32 in TensorFlow's order (horizontal, then vertical), then
    truncated to uint8 as MedSigLIP's notebooks do.
    """
    src = np.asarray(array, dtype=np.float32)
    if src.ndim == 2:
        src = src[..., None]
    (y0, y1, fy), (x0, x1, fx) = (_tf_axis(src.shape[0], size[0]),
                                  _tf_axis(src.shape[1], size[1]))
    fx = fx[None, :, None]
    top = src[y0][:, x0] + (src[y0][:, x1] - src[y0][:, x0]) * fx
    bottom = src[y1][:, x0] + (src[y1][:, x1] - src[y1][:, x0]) * fx
    out = top + (bottom - top) * fy[:, None, None]
    return out.astype(np.uint8)


def _tf_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(n_in) / np.float32(n_out)
    pos = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    low = np.floor(pos)
    lerp = (pos - low).astype(np.float32)
    lo = np.clip(low, 0, n_in - 1).astype(np.int64)
    hi = np.clip(np.ceil(pos), 0, n_in - 1).astype(np.int64)
    return lo, hi, lerp


def _shortest_edge(processor: Any) -> int | None:
    """CLIP-style processors: resize the short side to this, then centre-crop."""
    size = getattr(processor, "size", None)
    get = size.get if hasattr(size, "get") else (lambda k, s=size: getattr(s, k, None))
    edge = get("shortest_edge") if size is not None and not isinstance(size, int) else None
    if edge and getattr(processor, "do_center_crop", False):
        return int(edge)
    return None


def _processor_size(processor: Any) -> int:
    attrs = ("crop_size", "size") if getattr(processor, "do_center_crop", False) \
        else ("size", "crop_size")
    for attr in attrs:
        size = getattr(processor, attr, None)
        if size is None:
            continue
        if isinstance(size, int):
            return size
        get = size.get if hasattr(size, "get") else (lambda k, s=size: getattr(s, k, None))
        for key in ("height", "shortest_edge", "width"):
            if get(key):
                return int(get(key))
    raise ValueError(f"cannot read the image size of {type(processor).__name__}")


def _uniform(g: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


class Augment:
    """Random resized crop → flip → rotation → colour jitter; returns a ``size``² PIL image
    (``keep_aspect``, for pipelines that keep the aspect ratio, e.g. SigLIP 2 NaFlex: the
    crop's aspect is ``ratio`` times the image's, and the crop keeps it at an area of
    ``size``²)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.7, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 degrees: float = 10.0, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, keep_aspect: bool = False) -> None:
        self.size, self.scale, self.ratio, self.hflip = int(size), scale, ratio, hflip
        self.keep_aspect = keep_aspect
        self.degrees, self.brightness = degrees, brightness
        self.contrast, self.saturation = contrast, saturation

    def crop_box(self, width: int, height: int, g: torch.Generator | None
                 ) -> tuple[int, int, int, int]:
        """A random box with area in ``scale`` and aspect in ``ratio`` (relative to the
        image's with ``keep_aspect``); centre crop fallback (the whole image with it)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        base = width / height if self.keep_aspect else 1.0
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = base * math.exp(_uniform(g, log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x = int(torch.randint(0, width - w + 1, (), generator=g))
                y = int(torch.randint(0, height - h + 1, (), generator=g))
                return x, y, x + w, y + h
        if self.keep_aspect:
            return 0, 0, width, height
        side = min(width, height)
        x, y = (width - side) // 2, (height - side) // 2
        return x, y, x + side, y + side

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None
                 ) -> Image.Image:
        g = generator
        image = image.convert("RGB")
        box = self.crop_box(*image.size, g)
        out = (self.size, self.size)
        if self.keep_aspect:
            aspect = math.sqrt((box[2] - box[0]) / (box[3] - box[1]))
            out = (max(1, round(self.size * aspect)), max(1, round(self.size / aspect)))
        image = image.resize(out, Image.BILINEAR, box=box)
        if float(torch.rand((), generator=g)) < self.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.degrees:
            image = image.rotate(_uniform(g, -self.degrees, self.degrees),
                                 resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        for amount, enhancer in ((self.brightness, ImageEnhance.Brightness),
                                 (self.contrast, ImageEnhance.Contrast),
                                 (self.saturation, ImageEnhance.Color)):
            if amount:
                image = enhancer(image).enhance(_uniform(g, 1 - amount, 1 + amount))
        return image
