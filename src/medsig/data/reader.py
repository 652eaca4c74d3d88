"""Reader: collection rows -> decoded, preprocessed image batches (DataLoader workers).

Bad images are skipped and counted by reason; the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from medsig.data.images import load_image
from medsig.errors import ImageError


@dataclass
class ImageBatch:
    rows: list[int]  # row numbers in the collection
    pixels: torch.Tensor  # (b, 3, s, s)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (row, reason, message)


class _Images(Dataset):
    def __init__(self, paths: list[Path], rows: list[int], preprocess: Callable,
                 draft_size: int | None) -> None:
        self.paths, self.rows = paths, rows
        self.preprocess, self.draft_size = preprocess, draft_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            image = load_image(self.paths[row], draft_size=self.draft_size)
            return row, self.preprocess(image), None
        except ImageError as exc:
            return row, None, (exc.reason, str(exc))


def _collate(items) -> ImageBatch:
    good = [(r, x) for r, x, err in items if err is None]
    skipped = [(r, err[0], err[1]) for r, _, err in items if err is not None]
    pixels = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return ImageBatch([r for r, _ in good], pixels, skipped)


def read_batches(
    paths: list[Path],
    rows: list[int],
    preprocess: Callable,
    batch_size: int = 64,
    num_workers: int | None = None,
    draft_size: int | None = None,
) -> Iterator[ImageBatch]:
    """Yield preprocessed batches of `rows` (indices into `paths`), decoding in workers."""
    if num_workers is None:
        num_workers = default_workers()
    loader = DataLoader(_Images(paths, rows, preprocess, draft_size), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    yield from loader


def default_workers() -> int:
    from medsig.system import available_cores

    n = available_cores()
    # every core: decoding is the bottleneck for small models, and a large model's forward
    # leaves workers idle most of the time (measured in bench/embed.py)
    return min(8, n)
