"""Sharded embedding: several processes (torchrun / accelerate launch / `--processes N`).

Every process joins the process group its launcher describes in the environment (gloo: the
channel carries host tensors, also on GPU machines). Rank 0 decides which rows still need
embedding and broadcasts them; each process embeds its contiguous share. Workers send every
batch to rank 0 through point-to-point messages (a JSON part: ids, payloads, skips; then
float32 vectors): rank 0 writes them into a single-writer embedded store, or, with a server
URL, the workers write directly and send only the counts (one progress display, one
report). A send returns once rank 0 took the message, so at most one batch per process is
in flight; nothing here is unpickled.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medsig.errors import ConfigError, MedsigError
from medsig.train.distributed import world

_BATCH, _DONE = 1, 2
_HEAD, _BODY = 0, 1  # tags: a header from any rank, then its body from that rank


_GLOO: list[Any] = []  # the channel's group: None = the default group (already gloo)


def join_process_group() -> None:
    """Join the launcher's process group (WORLD_SIZE > 1) unless already in one (e.g. NCCL,
    set up by accelerate: then a gloo group over the same processes carries the channel).
    It stays for later calls (joining again after leaving hangs in gloo); a CLI leaves it."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    if dist.is_initialized() and not _GLOO:
        _GLOO.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))


def _group() -> Any:
    return _GLOO[0] if _GLOO else None


def barrier() -> None:
    dist.barrier(group=_group())


def leave_process_group() -> None:
    if dist.is_initialized():
        _GLOO.clear()
        dist.destroy_process_group()


@contextmanager
def peers_checked() -> Iterator[None]:
    """A process that lost a peer (which failed and printed its own error) stops with one
    line instead of gloo's traceback."""
    try:
        yield
    except RuntimeError as exc:
        rank, procs = world()
        lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
        if procs == 1 or not any(text in str(exc) for text in lost):
            raise
        raise MedsigError(f"process {rank} of {procs} stopped: another process failed (its "
                          "error is above)") from None


def rank_device(device: str | None) -> str | None:
    """Under a launcher on a CUDA machine, process k uses GPU LOCAL_RANK (unless pinned)."""
    procs = world()[1]
    if procs == 1 or not torch.cuda.is_available() or (device or "auto") not in ("auto", "cuda"):
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def broadcast_rows(rows: list[int] | None) -> list[int]:
    """Rank 0's `rows` on every process (the identity in one process)."""
    if world()[1] == 1:
        assert rows is not None
        return rows
    n = torch.tensor([len(rows) if rows is not None else 0], dtype=torch.long)
    dist.broadcast(n, 0, group=_group())
    t = torch.tensor(rows, dtype=torch.long) if rows is not None else torch.empty(
        int(n), dtype=torch.long)
    dist.broadcast(t, 0, group=_group())
    return t.tolist()


def shard(rows: list[int], rank: int, procs: int) -> list[int]:
    """Process `rank`'s contiguous share of `rows` (sizes differ by at most one)."""
    return rows[rank * len(rows) // procs:(rank + 1) * len(rows) // procs]


@dataclass
class Message:
    """One batch (or a process's end) as rank 0 receives it."""

    kind: int
    info: dict[str, Any]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.kind == _DONE


def _send(kind: int, info: dict[str, Any], vectors: dict[str, np.ndarray]) -> None:
    """To rank 0: a header [kind, JSON bytes, rows, vectors, dims...], the JSON, the vectors
    (float32, in the order of ``info["names"]``)."""
    names = info["names"] = sorted(vectors)
    body = torch.frombuffer(bytearray(json.dumps(info).encode()), dtype=torch.uint8)
    rows = len(vectors[names[0]]) if names else 0
    dims = [vectors[k].shape[1] for k in names]
    head = torch.tensor([kind, body.numel(), rows, len(names), *dims, *[0] * (4 - len(dims))],
                        dtype=torch.long)
    dist.send(head, 0, group=_group(), tag=_HEAD)
    dist.send(body, 0, group=_group(), tag=_BODY)
    for k in names:
        array = np.ascontiguousarray(vectors[k], dtype=np.float32)
        dist.send(torch.from_numpy(array), 0, group=_group(), tag=_BODY)


def send_batch(info: dict[str, Any], vectors: dict[str, np.ndarray] | None) -> None:
    """A batch: ids, payloads, skips and counts; vectors only when rank 0 writes them."""
    _send(_BATCH, info, vectors or {})


def send_done(info: dict[str, Any]) -> None:
    """This process's end: its stage timings."""
    _send(_DONE, info, {})


def receive() -> Message:
    """The next message from any worker (blocks)."""
    head = torch.zeros(8, dtype=torch.long)
    src = dist.recv(head, group=_group(), tag=_HEAD)
    kind, size, rows, count = (int(v) for v in head[:4])
    body = torch.empty(size, dtype=torch.uint8)
    dist.recv(body, src, group=_group(), tag=_BODY)
    info = json.loads(bytes(body.numpy()).decode())
    vectors = {}
    for name, dim in zip(info["names"], head[4:4 + count].tolist()):
        t = torch.empty((rows, int(dim)), dtype=torch.float32)
        dist.recv(t, src, group=_group(), tag=_BODY)
        vectors[name] = t.numpy()
    info["rank"] = src
    return Message(kind, info, vectors)


class Receiver:
    """Rank 0's thread taking the workers' messages until each sent its end; `handle` runs
    on this thread for every message (it must be thread-safe against rank 0's own batches)."""

    def __init__(self, workers: int, handle: Callable[[Message], None]) -> None:
        self.workers, self.handle = workers, handle
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="medsig-receiver", daemon=True)
        if workers:
            self._thread.start()

    def _run(self) -> None:
        done = 0
        try:
            while done < self.workers:
                message = receive()
                done += message.done
                self.handle(message)
        except BaseException as exc:  # re-raised on rank 0's main thread
            self.error = exc

    def join(self) -> None:
        if self.workers:
            self._thread.join()
        if self.error is not None:
            raise self.error


def check_not_launched(processes: int) -> None:
    """`--processes N` starts its own processes: not under another launcher."""
    if processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--processes starts its own processes: drop it under torchrun / "
                          "accelerate launch (they already set the number of processes)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(command: list[str], processes: int) -> int:
    """Run `command` in `processes` processes on this machine, with the environment torchrun
    would give them; if one fails the others are stopped. Exit status: the first failure's
    (128 + N for signal N), else 0."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    children = [subprocess.Popen(command, env={**env, "RANK": str(k), "LOCAL_RANK": str(k)})
                for k in range(processes)]
    failed: int | None = None  # the first process that failed
    try:
        while failed is None:
            running = None in [c.poll() for c in children]  # poll() every child
            failed = next((k for k, c in enumerate(children) if c.returncode), None)
            if not running:
                break
            time.sleep(0.2)
    finally:
        for c in children:
            if c.poll() is None:  # another process failed (or Ctrl-C): its peers wait forever
                c.kill()
            c.wait()
    status = children[failed].returncode if failed is not None else 0
    if status < 0:  # killed by a signal (it printed nothing): say which, exit as a shell does
        print(f"error: process {failed} of {processes} was killed by signal {-status}",
              file=sys.stderr)
        return 128 - status
    return status
