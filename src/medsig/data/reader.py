"""Reader: collection rows -> decoded, preprocessed image batches (DataLoader workers).

Bad images are skipped and counted by reason; the run goes on. With ``uint8=True`` the
workers only decode, pad and resize: batches carry ``(b, 3, s, s)`` uint8 pixels (a quarter
of the bytes of float32) that the consumer normalises on its device
(``Preprocess.normalize``). With ``texts`` and ``tokenize`` each batch's texts are tokenised
once, in the worker. ``pin_memory`` puts batches in page-locked memory for non-blocking
copies to a GPU. A SigLIP 2 NaFlex pipeline yields ``Patches`` (patches padded to
``max_num_patches``, their mask and grid shape) instead of a tensor; batches stack them the
same way (``medsig.data.patches``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from medsig.data.images import load_image
from medsig.data.patches import Pixels, stack_pixels
from medsig.errors import ImageError


@dataclass
class ImageBatch:
    rows: list[int]  # row numbers in the collection
    pixels: Pixels  # (b, 3, s, s): float32 normalised, or uint8 with uint8=True (or Patches)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (row, reason, message)
    texts: list[str] = field(default_factory=list)  # the kept rows' texts (when asked for)
    tokens: dict[str, torch.Tensor] | None = None  # their token ids (with a tokenizer)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        self.pixels = self.pixels.pin_memory()
        if self.tokens is not None:
            self.tokens = {k: v.pin_memory() for k, v in self.tokens.items()}
        return self


def load_pixels(path: Path, preprocess: Callable, draft_size: int | None = None,
                augment: Callable | None = None, generator: torch.Generator | None = None
                ) -> tuple[Pixels | None, tuple[str, str] | None]:
    """One image decoded, optionally augmented (seeded by ``generator``) and preprocessed:
    ``(pixels, None)``, or ``(None, (reason, message))`` for an image that cannot be read.
    The one decoding step of every dataset (embedding here, training in train/data.py)."""
    try:
        image = load_image(path, draft_size=draft_size)
    except ImageError as exc:
        return None, (exc.reason, str(exc))
    if augment is not None:
        image = augment(image, generator=generator)
    return preprocess(image), None


class _Images(Dataset):
    def __init__(self, paths: list[Path], rows: list[int], preprocess: Callable,
                 draft_size: int | None, texts: list[str] | None) -> None:
        self.paths, self.rows, self.texts = paths, rows, texts
        self.preprocess, self.draft_size = preprocess, draft_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        text = self.texts[i] if self.texts is not None else None
        pixels, error = load_pixels(self.paths[row], self.preprocess, self.draft_size)
        return row, pixels, error, text


def _collate(items, tokenize: Callable | None = None) -> ImageBatch:
    good = [(r, x, t) for r, x, err, t in items if err is None]
    skipped = [(r, err[0], err[1]) for r, _, err, _ in items if err is not None]
    pixels = stack_pixels([x for _, x, _ in good]) if good else torch.empty(0)
    texts = [t for _, _, t in good if t is not None]
    tokens = tokenize(texts) if tokenize is not None and texts else None
    return ImageBatch([r for r, _, _ in good], pixels, skipped, texts, tokens)


def read_batches(
    paths: list[Path],
    rows: list[int],
    preprocess: Callable,
    batch_size: int = 64,
    num_workers: int | None = None,
    draft_size: int | None = None,
    *,
    uint8: bool = False,
    texts: list[str] | None = None,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    pin_memory: bool = False,
) -> Iterator[ImageBatch]:
    """Yield preprocessed batches of `rows` (indices into `paths`), decoding in workers.

    `uint8` needs a ``Preprocess`` (its ``to_uint8``); `texts` are aligned with `rows`.
    """
    if num_workers is None:
        num_workers = default_workers()
    if uint8:
        preprocess = preprocess.to_uint8  # type: ignore[attr-defined]
    loader = DataLoader(_Images(paths, rows, preprocess, draft_size, texts),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=partial(_collate, tokenize=tokenize),
                        persistent_workers=False, pin_memory=pin_memory,
                        prefetch_factor=4 if num_workers > 0 else None)
    yield from loader


def default_workers() -> int:
    from medsig.system import available_cores

    n = available_cores()
    # every core: decoding is the bottleneck for small models (a GPU needs many cores, see
    # docs/gpu.md); a large model's forward leaves workers idle (measured in bench/embed.py)
    return min(32, n)
