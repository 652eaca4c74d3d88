"""medsig's image preprocessing as a plain transformers image processor (no medsig import).

This file is copied into classifier folders as ``image_processing_medsig.py`` and named in
``preprocessor_config.json``'s ``auto_map``, so that

    AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)

gives the pixels medsig gave in training, evaluation and serving: the image zero-padded to
a centred square on a black canvas (``pad_to_square``), then resized with PIL to
``size`` x ``size`` and rescaled / normalised (the PIL backend, as medsig does it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend


def square_canvas(image: Any) -> Image.Image:
    """An RGB PIL image centred on a black square of its longer side."""
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
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


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
            image = square_canvas(image)
        return super().process_image(image, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["pad_to_square"] = self.pad_to_square
        return out
