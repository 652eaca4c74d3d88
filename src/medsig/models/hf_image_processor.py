"""medsig's image preprocessing as a plain transformers image processor (no medsig import).

This file is copied into classifier folders as ``image_processing_medsig.py`` and named in
``preprocessor_config.json``'s ``auto_map``, so that

    AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)

gives the pixels medsig gave in training, evaluation and serving: the image zero-padded to
a centred square on a black canvas (``pad_to_square``), then resized with PIL to
``size`` x ``size`` and rescaled / normalised (the PIL backend, as medsig does it). Like
``medsig.data.transforms``, an elongated image (canvas over ``MAX_PAD_RATIO`` times the
image) is resized first, its long side to ``size``, then centred on the black canvas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend

MAX_PAD_RATIO = 2.0


def square_canvas(image: Any, size: int | None = None, resample: int = 3) -> Image.Image:
    """An RGB PIL image centred on a black square of its longer side (with ``size``: of
    ``size`` x ``size`` pixels, resized as medsig's ``pad_resize`` does)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.dtype != np.uint8:
            scale = 255.0 if float(array.max(initial=0)) <= 1.0 else 1.0
            array = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(array.squeeze())
    image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    if size is not None and side * side > MAX_PAD_RATIO * w * h:  # elongated: resize first
        scale = size / side
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if w != h:
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), resample)
    return image


class MedsigImageProcessor(PilBackend):
    """Pad to square (when ``pad_to_square``), then PIL resize, rescale and normalise."""

    model_input_names = ["pixel_values"]
    resample = 3  # bicubic
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_center_crop = False
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]

    def __init__(self, pad_to_square: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pad_to_square = pad_to_square

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        if self.pad_to_square:
            size = self.size.get("height") if isinstance(self.size, dict) else \
                getattr(self.size, "height", None)
            image = square_canvas(image, size, int(self.resample))
        return super().process_image(image, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["pad_to_square"] = self.pad_to_square
        return out
