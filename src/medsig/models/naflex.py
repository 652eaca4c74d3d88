"""SigLIP 2 NaFlex inputs: the image at its own aspect ratio, as at most N patches.

The reference is transformers' ``Siglip2ImageProcessor`` (its PIL backend,
``Siglip2ImageProcessorPil``, the one transformers loads without torchvision): the image is
resized, keeping its aspect ratio, to the largest size whose sides are multiples of the
patch size with at most ``max_num_patches`` patches (transformers'
``get_image_size_for_max_num_patches``, reused here), with the processor's filter (bilinear);
rescaled by 1/255, normalised (mean = std = 0.5), cut into ``patch_size``² patches (rows of
``patch_size * patch_size * 3`` values, channel last) and padded with zero rows to
``max_num_patches``; ``pixel_attention_mask`` marks the real patches and ``spatial_shapes``
the patch grid (rows, columns). The SigLIP 2 paper (arXiv 2502.14786, "NaFlex") describes
the same: resize so that both sides are multiples of the patch size, keeping the aspect
ratio as far as possible, with the sequence length at most the target.

``NaflexPreprocess`` reproduces it with PIL and torch, split like ``Preprocess`` into
``to_uint8`` (decode, resize, patchify: what data workers ship) and ``normalize`` (on any
device), and returns ``medsig.data.patches.Patches``. ``max_num_patches`` is an option
(the processor's by default) recorded in the model folder (``families.write_record``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from medsig.data.patches import Patches
from medsig.data.transforms import mean_std_on
from medsig.errors import ConfigError

FAMILY = "siglip2-naflex"
NAFLEX_MODES = ("reference", "processor")


def target_size(height: int, width: int, patch_size: int, max_num_patches: int
                ) -> tuple[int, int]:
    """(height, width) of the resized image: transformers' own rule."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    return get_image_size_for_max_num_patches(height, width, patch_size, max_num_patches)


def patchify(array: np.ndarray, patch_size: int, max_num_patches: int) -> Patches:
    """``(H, W, C)`` pixels (sides multiples of ``patch_size``) -> padded ``Patches``."""
    h, w, c = array.shape
    rows, cols = h // patch_size, w // patch_size
    x = torch.from_numpy(np.array(array))  # a writable copy (PIL arrays are read-only)
    x = x.reshape(rows, patch_size, cols, patch_size, c).permute(0, 2, 1, 3, 4)
    x = x.reshape(rows * cols, patch_size * patch_size * c)
    n = rows * cols
    values = torch.zeros((max_num_patches, x.shape[1]), dtype=x.dtype)
    values[:n] = x
    mask = torch.zeros(max_num_patches, dtype=torch.int32)
    mask[:n] = 1
    return Patches(values, mask, torch.tensor([rows, cols], dtype=torch.int64))


class NaflexPreprocess:
    """PIL RGB image -> ``Patches`` (float32, normalised) as Siglip2ImageProcessor makes them."""

    keeps_aspect = True  # augmentation should keep the crop's aspect ratio too
    resize_method = "pil"
    shortest_edge = None

    def __init__(self, patch_size: int = 16, max_num_patches: int = 256,
                 mean: Any = (0.5, 0.5, 0.5), std: Any = (0.5, 0.5, 0.5),
                 resample: int = Image.BILINEAR, rescale: float = 1 / 255,
                 mode: str = "reference", processor: Any = None) -> None:
        if mode not in NAFLEX_MODES:
            raise ConfigError(f"preprocess '{mode}' is for fixed-resolution models; a SigLIP 2 "
                              "NaFlex model keeps each image's aspect ratio (use reference)")
        if isinstance(max_num_patches, bool) or not isinstance(max_num_patches, int) \
                or max_num_patches < 1:
            raise ConfigError(f"max_num_patches must be a positive integer, got "
                              f"{max_num_patches!r}")
        if mode == "processor" and processor is None:
            raise ValueError("preprocess mode 'processor' needs the image processor")
        self.patch_size, self.max_num_patches = int(patch_size), int(max_num_patches)
        self.mode, self.processor, self.resample = mode, processor, int(resample)
        self.rescale = float(rescale)
        self.mean = torch.tensor(list(mean), dtype=torch.float32)
        self.std = torch.tensor(list(std), dtype=torch.float32)
        # the side of a square image's grid: what JPEG draft decoding must keep (short side)
        self.size = self.patch_size * math.isqrt(self.max_num_patches)
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_processor(cls, processor: Any, mode: str = "reference",
                       max_num_patches: int | None = None) -> NaflexPreprocess:
        """Patch size, max_num_patches (unless given), filter, mean, std of the processor."""
        resample = getattr(processor, "resample", None)
        return cls(int(getattr(processor, "patch_size", 16) or 16),
                   max_num_patches or int(getattr(processor, "max_num_patches", 256) or 256),
                   getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5),
                   getattr(processor, "image_std", None) or (0.5, 0.5, 0.5),
                   Image.BILINEAR if resample is None else int(resample),
                   getattr(processor, "rescale_factor", None) or 1 / 255, mode,
                   processor if mode == "processor" else None)

    def describe(self) -> dict[str, Any]:
        """What this pipeline does, as JSON (recorded in a model folder)."""
        return {"mode": self.mode, "size": self.size, "resize_method": self.resize_method,
                "resample": self.resample, "shortest_edge": None,
                "mean": self.mean.tolist(), "std": self.std.tolist(),
                "patch_size": self.patch_size, "max_num_patches": self.max_num_patches}

    @property
    def splits(self) -> bool:
        return self.mode != "processor"

    def __call__(self, image: Image.Image) -> Patches:
        if self.mode == "processor":
            out = self.processor(images=image.convert("RGB"), patch_size=self.patch_size,
                                 max_num_patches=self.max_num_patches, return_tensors="pt")
            return Patches.of(out)[0]
        return self.normalize(self.to_uint8(image))

    def to_uint8(self, image: Image.Image) -> Patches:
        """Resize (aspect kept) and patchify only: uint8 ``Patches`` (what workers ship)."""
        image = image.convert("RGB")
        height, width = target_size(image.height, image.width, self.patch_size,
                                    self.max_num_patches)
        if image.size != (width, height):
            image = image.resize((width, height), self.resample)
        return patchify(np.asarray(image), self.patch_size, self.max_num_patches)

    def normalize(self, patches: Patches) -> Patches:
        """uint8 ``Patches`` (one image or a batch) on any device -> normalised float32 there;
        padding rows stay zero, as the processor pads after normalising."""
        x = patches.pixel_values
        mean, std = mean_std_on(self, x.device)
        values = x.float().mul_(self.rescale).unflatten(-1, (-1, mean.numel()))
        values = ((values - mean) / std).flatten(-2)
        values = values * patches.pixel_attention_mask.to(values.dtype).unsqueeze(-1)
        return Patches(values, patches.pixel_attention_mask, patches.spatial_shapes)

    def __getstate__(self) -> dict[str, Any]:  # data workers get no device tensors
        return {**self.__dict__, "_on_device": {}}

    def __repr__(self) -> str:
        return (f"NaflexPreprocess(patch_size={self.patch_size}, "
                f"max_num_patches={self.max_num_patches}, mode={self.mode!r})")
