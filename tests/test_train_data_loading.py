"""Training data loading: the read-ahead thread and the CPU thread budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from medsig.train.data import Prefetch, training_threads


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medsig-prefetch"]


def test_prefetch_yields_every_item_in_order() -> None:
    assert list(Prefetch(iter(range(50)), depth=2)) == list(range(50))


def test_prefetch_raises_the_producers_error_where_it_is_consumed() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("corrupt batch")

    it = Prefetch(source(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="corrupt batch"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_reads_at_most_depth_ahead_and_close_stops_the_thread() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(1000):
            produced.append(i)
            yield i

    it = Prefetch(source(), depth=2)
    assert not produced, "nothing is read before the first item is asked for"
    assert next(it) == 0
    time.sleep(0.3)
    # the queue holds 2; one more may wait in the producer's hand
    assert len(produced) <= 4
    it.close()
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(it)


def test_an_unread_prefetch_starts_no_thread() -> None:
    it = Prefetch(iter(range(3)), depth=2)
    assert not _prefetch_threads()
    it.close()


def test_training_threads_are_set_on_cpu_and_restored() -> None:
    before = torch.get_num_threads()
    with training_threads(1, workers=0, device="cpu") as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with training_threads(None, workers=0, device="cpu") as n:
        assert n >= 1
    assert torch.get_num_threads() == before
