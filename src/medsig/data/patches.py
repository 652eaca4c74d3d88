"""Patchified pixels (SigLIP 2 NaFlex) that move through the pipeline like a pixel tensor.

A NaFlex image is not a ``(3, s, s)`` tensor but three: ``pixel_values`` ``(N, P)`` (the
image's patches, zero rows up to ``N = max_num_patches``), ``pixel_attention_mask`` ``(N,)``
(1 = a real patch) and ``spatial_shapes`` ``(2,)`` (the patch grid's rows and columns).
``Patches`` holds them and behaves as the pixel tensors of the fixed-resolution families do
where the pipeline handles pixels without looking inside: ``to(device, dtype)`` (the dtype
casts ``pixel_values`` only), ``pin_memory()``, ``len()`` (images), indexing by image
(``p[None]``, ``p[2:4]``) and ``stack_pixels`` (a batch of images or of tensors).
``inputs()`` is the dict a transformers model takes (``model(**p.inputs())``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

FIELDS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


@dataclass
class Patches:
    """One image (``pixel_values`` (N, P)) or a batch ((B, N, P)) of NaFlex patches."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    spatial_shapes: torch.Tensor

    @classmethod
    def of(cls, features: Any) -> Patches:
        """From a mapping with the three keys (a transformers ``BatchFeature``)."""
        return cls(*(torch.as_tensor(features[k]) for k in FIELDS))

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword inputs."""
        return {k: getattr(self, k) for k in FIELDS}

    @property
    def dtype(self) -> torch.dtype:
        return self.pixel_values.dtype

    @property
    def device(self) -> torch.device:
        return self.pixel_values.device

    @property
    def shape(self) -> torch.Size:
        return self.pixel_values.shape

    def to(self, *args: Any, non_blocking: bool = False, **kwargs: Any) -> Patches:
        """As ``Tensor.to``: a device moves all three, a dtype casts ``pixel_values`` only."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        moved = [t.to(device, non_blocking=non_blocking) if device is not None else t
                 for t in (self.pixel_values, self.pixel_attention_mask, self.spatial_shapes)]
        if dtype is not None:
            moved[0] = moved[0].to(dtype)
        return Patches(*moved)

    def pin_memory(self) -> Patches:
        return Patches(*(t.pin_memory() for t in self._tensors()))

    def __len__(self) -> int:
        return len(self.pixel_values) if self.pixel_values.dim() == 3 else 1

    def __getitem__(self, index: Any) -> Patches:
        return Patches(*(t[index] for t in self._tensors()))

    def images(self) -> list[torch.Tensor]:
        """The batch's images as ``(3, h, w)`` tensors (the real patches put back on their
        grid; transformers lays a patch out as ``(p, p, 3)``)."""
        batch = self if self.pixel_values.dim() == 3 else self[None]
        patch = int(round((batch.pixel_values.shape[-1] / 3) ** 0.5))
        out = []
        for values, (rows, cols) in zip(batch.pixel_values, batch.spatial_shapes.tolist()):
            grid = values[: rows * cols].reshape(rows, cols, patch, patch, 3)
            out.append(grid.permute(4, 0, 2, 1, 3).reshape(3, rows * patch, cols * patch))
        return out

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pixel_values, self.pixel_attention_mask, self.spatial_shapes


Pixels = torch.Tensor | Patches


def stack_pixels(items: Sequence[Pixels]) -> Pixels:
    """A batch of single images: ``torch.stack`` for tensors, field by field for Patches
    (every image is already padded to the same ``max_num_patches``)."""
    items = list(items)
    if items and isinstance(items[0], Patches):
        return Patches(*(torch.stack([getattr(p, k) for p in items]) for k in FIELDS))
    return torch.stack(items)


def model_inputs(pixels: Pixels) -> dict[str, torch.Tensor]:
    """Keyword inputs of a vision model for ``pixels`` (a tensor: ``pixel_values`` only)."""
    return pixels.inputs() if isinstance(pixels, Patches) else {"pixel_values": pixels}
