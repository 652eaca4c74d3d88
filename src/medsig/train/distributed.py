"""Collectives for data-parallel training (torch.distributed, as set up by accelerate/torchrun).

Every helper is the identity in a single process, so the training code has one path.
Gathers keep the processes' order (rank 0 first): each process holds a contiguous slice of
every global batch (``medsig.train.data.shard``), so a gathered tensor is the global batch
in the single-process order. Slices may differ in length (a small last batch, a skipped
image): tensors are padded to the longest slice for the collective and trimmed again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def _sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world()[1])]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _gather_padded(t: Tensor, sizes: list[int]) -> Tensor:
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather(t: Tensor) -> Tensor:
    """All processes' rows of ``t`` (no gradient), rank 0's first."""
    if not is_distributed():
        return t
    return _gather_padded(t.detach(), _sizes(t.shape[0], t.device))


class _GatherWithGrad(torch.autograd.Function):
    """all-gather whose backward returns to each process the gradient of its own rows,
    summed over the processes (every process computes the loss of the global batch)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        sizes = _sizes(t.shape[0], t.device)
        rank = world()[0]
        ctx.start, ctx.n = sum(sizes[:rank]), t.shape[0]
        return _gather_padded(t, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.n]


def gather_with_grad(t: Tensor) -> Tensor:
    """All processes' rows of ``t``; gradients flow back to the process that owns each row.

    Each process then computes the loss of the whole global batch, so the summed gradient
    of a local row is ``world_size`` times its single-process gradient, which DDP's mean over
    processes brings back to exactly the single-process gradient of the parameters.
    """
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


def gather_rows(rows: list[int], *tensors: Tensor) -> tuple[list[int], list[Tensor]]:
    """Rows (indices) and their per-row tensors from all processes, sorted by row: the
    order a single process that read every row in index order would have."""
    if not is_distributed():
        return rows, list(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    index = gather(torch.as_tensor(rows, dtype=torch.long, device=device))
    order = torch.argsort(index, stable=True)
    return index[order].tolist(), [gather(t)[order.to(t.device)] for t in tensors]


def sum_counts(counts: Tensor) -> Tensor:
    """Element-wise sum over the processes (e.g. rows per micro-batch)."""
    if not is_distributed():
        return counts
    counts = counts.clone()
    dist.all_reduce(counts)
    return counts


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every process (e.g. an epoch plan)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_counters(counter: dict[str, int]) -> dict[str, int]:
    """A dict of counts summed over the processes (skipped images)."""
    if not is_distributed():
        return dict(counter)
    parts: list[Any] = [None] * world()[1]
    dist.all_gather_object(parts, dict(counter))
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def global_batch(rows: list[int], feats: list[Tensor], ghost: bool = False
                 ) -> tuple[list[int], list[Tensor], Tensor]:
    """The global batch of a micro-batch: (rows, features gathered with gradient, anchor).

    A ``ghost`` slice (a stand-in row loaded because this process's share of the global
    batch is empty) contributes no row; ``anchor`` (zero) keeps its features in the graph
    so that DDP still sees every parameter used: add it to the loss.
    """
    n = 0 if ghost else len(rows)
    anchor = sum((f[n:].sum() for f in feats), torch.zeros((), device=feats[0].device)) * 0.0
    device = feats[0].device
    everyone = gather(torch.as_tensor(rows[:n], dtype=torch.long, device=device)).tolist()
    return everyone, [gather_with_grad(f[:n]) for f in feats], anchor


def no_sync_unless(accelerator: Any, module: Any, last: bool) -> Any:
    """DDP's no_sync (gradients accumulate locally) on every micro-batch but the last, so
    gradients are all-reduced once per optimizer step. A sharded (FSDP) module reduces every
    micro-batch: accumulating locally would keep whole, unsharded gradients."""
    import contextlib

    if last or is_sharded(module):
        return contextlib.nullcontext()
    return accelerator.no_sync(module)


# ----------------------------------------------------------------------------- FSDP tensors
def is_sharded(module: Any) -> bool:
    """Whether ``module`` is or holds an FSDP (fully_shard) unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def whole(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP shard (a collective: every process calls it, in the same
    order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the same on every process) cut like the parameter ``like`` (its shard on
    this process; no communication), or moved to its device when ``like`` is whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(like.device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _optimizer_params(optimizer: Any) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(optimizer: Any, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors (the same file with or without FSDP).
    Under FSDP every process calls it (a gather per tensor); only the main one need `keep`."""
    raw = optimizer.state_dict()
    state = {}
    for i, s in raw["state"].items():
        s = {k: whole(v) if isinstance(v, Tensor) else v for k, v in s.items()}
        if keep:
            state[i] = s
    return {**raw, "state": state}


def load_optimizer_state(optimizer: Any, raw: dict[str, Any]) -> None:
    """Load a state written by `optimizer_state`, each tensor cut like its parameter."""
    params = _optimizer_params(optimizer)
    state = {}
    for i, s in raw["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        state[i] = {k: shard_like(v, p) if p is not None and isinstance(v, Tensor)
                    and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict({**raw, "state": state})
