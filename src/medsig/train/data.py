"""Training data: the split collection, fingerprints, per-epoch row plans and image loaders.

Every random choice of an epoch (order, oversampling, templates, augmentation) is derived
from (seed, epoch, row), so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medsig.data.collection import Collection, load_collection
from medsig.data.patches import Pixels, stack_pixels
from medsig.data.reader import load_pixels
from medsig.data.sampling import oversample_indices
from medsig.data.text import render_text
from medsig.errors import ConfigError
from medsig.models.device import select_device
from medsig.system import available_cores
from medsig.train.config import TrainConfig


# ----------------------------------------------------------------------------- collection
@dataclass
class TrainData:
    collection: Collection
    train: Collection
    val: Collection
    labels: list[str]

    @property
    def counts(self) -> dict[str, int]:
        assert self.collection.split is not None
        return dict(Counter(str(s) for s in self.collection.split))


def load_train_data(cfg: TrainConfig) -> TrainData:
    """The collection of the config's spec, with its split and the labels to train on."""
    collection = load_collection(cfg.spec)
    if collection.split is None:
        raise ConfigError("the collection has no train / val split; run `medsig data split "
                          f"{cfg.spec}` first (or name a split column in the spec)",
                          file=cfg.spec)
    labels = check_labels(collection, cfg.labels, cfg.spec)
    train = collection.select_split("train")
    val = collection.select_split("val")
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise ConfigError(f"the {name} split is empty", file=cfg.spec)
    return TrainData(collection, train, val, labels)


def check_labels(collection: Collection, names: Sequence[str] | None, where: Any = None
                 ) -> list[str]:
    """The requested label names (default: all), each present in the spec."""
    available = list(collection.labels)
    if names is None:
        return available
    absent = [n for n in names if n not in collection.labels]
    if absent:
        raise ConfigError(f"label(s) {', '.join(absent)} not in the spec (labels: "
                          f"{', '.join(available) or 'none'})", file=where)
    return list(names)


def spec_fingerprint(collection: Collection) -> str:
    """sha256 of the spec file and table bytes."""
    h = hashlib.sha256()
    spec = collection.spec
    for path in (spec.path, spec.table_path):
        if path is not None and Path(path).is_file():
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def split_fingerprint(collection: Collection) -> str:
    """sha256 of the sorted (id, split) pairs."""
    assert collection.split is not None
    pairs = sorted(zip(collection.ids, (str(s) for s in collection.split)))
    return hashlib.sha256("\n".join(f"{i}\t{s}" for i, s in pairs).encode()).hexdigest()


# ----------------------------------------------------------------------------- randomness
def seed_of(*parts: object) -> int:
    """A stable 63-bit seed from any parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_texts(collection: Collection, cfg: TrainConfig, epoch: int) -> list[str]:
    """Per-row texts: the description column (else the first template), or with
    `data.text: templates` a random spec template per row and epoch (the description when
    no template can be filled for that row)."""
    if cfg.data.text == "description":
        return collection.texts()
    templates = collection.spec.templates
    if not templates:
        raise ConfigError("data.text 'templates' needs templates in the spec",
                          file=collection.spec.path)
    out = []
    for i, r in enumerate(collection.rows):
        rng = random.Random(seed_of(cfg.seed, "text", epoch, int(r)))
        out.append(render_text(None, templates, lambda name, i=i: collection.lookup(i, name),
                               rng, fallback=collection.text(i)))
    return out


# ----------------------------------------------------------------------------- sampling
def single_class(collection: Collection, name: str) -> np.ndarray:
    """One class id per row for any label kind (-1 missing); multilabel: the top weight or
    the first present class."""
    lab = collection.labels[name]
    if lab.kind != "multilabel":
        return lab.targets.astype(np.int64)
    score = lab.weights if lab.weights is not None else lab.targets
    score = np.where(lab.targets > 0, score + 1e-6, -np.inf)
    out = np.argmax(score, axis=1).astype(np.int64)
    out[~(lab.targets > 0).any(axis=1)] = -1
    return out


def epoch_pool(train: Collection, cfg: TrainConfig, labels: list[str], epoch: int
               ) -> np.ndarray:
    """Train row indices for one epoch (oversampled / class-balanced when configured)."""
    pool = np.arange(len(train))
    if cfg.data.oversample is not None:
        over = cfg.data.oversample
        pool = oversample_indices(train, str(over["label"]), int(over.get("min_count", 30)),
                                  seed=seed_of(cfg.seed, "oversample", epoch) % 2**32,
                                  split=None)
    if cfg.data.class_balanced:
        name = cfg.data.balance_label or labels[0]
        if name not in train.labels:
            raise ConfigError(f"data.balance_label '{name}' is not a label of the spec")
        cls = single_class(train, name)[pool]
        freq = Counter(cls[cls >= 0].tolist())
        weights = np.array([1.0 / freq[c] if c >= 0 else 0.0 for c in cls])
        if weights.sum() == 0:
            raise ConfigError(f"class-balanced sampling: label '{name}' has no value in train")
        weights[cls < 0] = weights[cls >= 0].mean()  # missing rows keep an average chance
        rng = np.random.default_rng(seed_of(cfg.seed, "balance", epoch))
        pool = rng.choice(pool, size=len(pool), replace=True, p=weights / weights.sum())
    return pool


def step_batches(pool: np.ndarray, step_size: int, seed: int, drop_last: bool
                 ) -> list[list[int]]:
    """Shuffle the pool and cut it into optimizer-step batches of `step_size` rows."""
    order = np.random.default_rng(seed).permutation(pool)
    if len(order) <= step_size:
        return [order.tolist()]
    n = len(order) // step_size if drop_last else -(-len(order) // step_size)
    return [order[i * step_size:(i + 1) * step_size].tolist() for i in range(n)]


def micro_batches(step: list[int], batch_size: int) -> list[list[int]]:
    return [step[i:i + batch_size] for i in range(0, len(step), batch_size)]


def shard(rows: Sequence[Any], rank: int, world: int) -> list[Any]:
    """This process's contiguous slice of a global batch (lengths differ by at most one,
    the first processes taking the extra rows), so that the processes' slices, gathered in
    rank order, are the global batch in its order."""
    if world <= 1:
        return list(rows)
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return list(rows[start:start + base + (1 if rank < extra else 0)])


def eval_batches(n: int, size: int, rank: int = 0, world: int = 1, lockstep: bool = False
                 ) -> list[list[int]]:
    """This process's contiguous share of rows 0..n-1, in batches of at most ``size``.
    ``lockstep`` (FSDP, where every forward is a collective): every process gets the
    same number of batches, that of the longest share (n >= world: none is empty)."""
    mine = shard(range(n), rank, world)
    if not lockstep:
        return [mine[i:i + size] for i in range(0, len(mine), size)]
    count = math.ceil(math.ceil(n / world) / size)
    return [part.tolist() for part in np.array_split(np.asarray(mine, dtype=int), count)]


# ----------------------------------------------------------------------------- images
@dataclass
class Batch:
    rows: list[int]  # row indices into the split collection
    pixels: Pixels  # a tensor, or NaFlex Patches
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    # a stand-in row that only lets this process take part in a step whose global batch
    # left it no row (several processes, a batch smaller than their number): no loss
    ghost: bool = False


class RowImages(Dataset):
    """Row index -> preprocessed (and, for training, augmented) pixels.

    A key is a row or ``(epoch, row)``: the augmentation is seeded by both, so a loader
    process that lives for the whole run augments each epoch differently (a bare row: 0).
    """

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Any], torch.Tensor],
                 augment: Callable[..., Any] | None = None, seed: int = 0,
                 draft_size: int | None = None) -> None:
        self.paths, self.preprocess, self.augment = list(paths), preprocess, augment
        self.seed, self.draft_size = seed, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]
                    ) -> tuple[int, torch.Tensor | None, str | None]:
        epoch, row = key if isinstance(key, tuple) else (0, key)
        g = (torch.Generator().manual_seed(seed_of(self.seed, "augment", epoch, row))
             if self.augment is not None else None)
        pixels, error = load_pixels(self.paths[row], self.preprocess, self.draft_size,
                                    self.augment, g)
        return row, pixels, error[0] if error else None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(r, x) for r, x, _ in items if x is not None]
    skipped = [(r, reason) for r, x, reason in items if x is None and reason is not None]
    pixels = stack_pixels([x for _, x in good]) if good else torch.empty(0)
    return Batch([r for r, _ in good], pixels, skipped)


class Plan(Sampler):
    """A batch sampler whose batches are set before each pass (the loader is reused)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PersistentLoader:
    """One DataLoader for a whole run: its worker processes start once, not every epoch.

    ``loader(batches)`` iterates over explicit index batches; an index may be
    ``(epoch, row)`` so that a long-lived worker augments with the right epoch's seed.

    With no worker processes, batches are prepared one or two ahead in a background
    thread instead (image decoding and resizing release the GIL, so the next batch is
    decoded while the model runs), unless ``prefetch`` is 0.
    """

    def __init__(self, dataset: RowImages, num_workers: int, seed: int = 0,
                 prefetch: int = 2) -> None:
        self.plan = Plan()
        self.prefetch = prefetch if num_workers == 0 else 0
        self.loader = DataLoader(dataset, batch_sampler=self.plan, num_workers=num_workers,
                                 collate_fn=_collate, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(seed))
        self._ahead: Prefetch | None = None

    def __call__(self, batches: list[list[Any]]) -> Iterator[Batch]:
        self.stop()
        self.plan.batches = [list(b) for b in batches]
        if not self.prefetch:
            return iter(self.loader)
        self._ahead = Prefetch(iter(self.loader), self.prefetch)
        return self._ahead

    def stop(self) -> None:
        """Stop reading ahead (a pass left unfinished, or the end of the run)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


class Prefetch(Iterator[Batch]):
    """Items of an iterator produced up to ``depth`` ahead by a daemon thread, in order;
    an error raised while producing is raised again where the item is consumed."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        # started at the first item: an iterator nobody reads costs no thread
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="medsig-prefetch")

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
            return
        self._put((self._END, None))

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self._thread.ident is None:
            self._thread.start()
        item, exc = self._queue.get()
        if exc is not None:
            self._done = True
            raise exc
        if item is self._END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        if self._thread.ident is not None:
            self._thread.join(timeout=10)


def loader_workers(configured: int | None) -> int:
    """Loader processes: the config's value, else one per core left to the model (max 4),
    none on 2 cores or fewer.

    With 0 processes a background thread prepares the next batches (``Prefetch``). On 2
    cores that thread plus one torch thread trained 5-10 % faster than one loader process
    plus one torch thread, and 1.3x faster than decoding between steps with two torch
    threads (docs/training.md, experiment 4). Processes live for the whole run.
    """
    if configured is not None:
        return configured
    cores = available_cores()
    return 0 if cores <= 2 else min(4, cores - 1)


@contextlib.contextmanager
def training_threads(configured: int | None, workers: int, device: str) -> Iterator[int]:
    """Torch intra-op threads while training on CPU: the config's value, else the cores
    left by the loader processes (or by the prefetch thread when there are none), at
    least 1, so that loading and the model do not fight for cores (OpenMP threads waiting
    for a busy core stall a whole step). Restored afterwards; untouched on a GPU."""
    before = torch.get_num_threads()
    on_cpu = select_device(device).type == "cpu"
    wanted = configured or (max(1, available_cores() - max(workers, 1)) if on_cpu else None)
    if wanted is None or wanted == before:
        yield before
        return
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)
