"""Gradient caching (Gao et al. 2021): a contrastive loss over a batch too large to encode at once.

1. embed every chunk without grad (saving the RNG state before each chunk);
2. compute the loss over the whole batch on detached embeddings (with the real
   ``logit_scale`` / ``logit_bias`` parameters, which get their gradient here) and backward
   it to cache d loss / d embedding;
3. re-encode each chunk with grad (same RNG state, so the same dropout masks) and
   backpropagate the cached gradient into the encoder.

Encoders L2-normalise inside ``encode_images`` / ``encode_texts``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medsig.errors import ConfigError

Backward = Callable[[Tensor], Any]
LossFn = Callable[[Tensor, Tensor], Tensor]


class RngState:
    """The CPU and (when initialised) CUDA RNG states, to replay a forward pass exactly."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (torch.cuda.get_rng_state_all()
                     if torch.cuda.is_available() and torch.cuda.is_initialized() else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _tensor_backward(loss: Tensor) -> None:
    loss.backward()


def _embed_no_grad(encode: Callable[[Any], Tensor], chunks: Sequence[Any]
                   ) -> tuple[list[Tensor], list[RngState]]:
    embs, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState())
            embs.append(encode(chunk))
    return embs, states


def gradcache_step(
    encode_images: Callable[[Tensor], Tensor],
    encode_texts: Callable[[Any], Tensor],
    image_chunks: Sequence[Tensor],
    text_chunks: Sequence[Any],
    loss_fn: LossFn,
    backward: Backward | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """One gradient-cached forward/backward over all chunks; returns the detached loss.

    ``backward`` (default ``Tensor.backward``; e.g. ``accelerator.backward``) is applied to the
    full-batch loss only: any loss scaling it does is then already in the cached gradients,
    so the per-chunk encoder passes use plain ``torch.autograd.backward``. ``no_sync``
    (e.g. a DDP model's ``no_sync``) wraps every chunk pass except the last one.
    Parameter gradients accumulate into ``.grad``; the caller zeroes them and steps.
    """
    if len(image_chunks) == 0 or len(text_chunks) == 0:
        raise ConfigError("gradient caching needs at least one image and one text chunk")
    backward = backward or _tensor_backward

    img_embs, img_states = _embed_no_grad(encode_images, image_chunks)
    txt_embs, txt_states = _embed_no_grad(encode_texts, text_chunks)

    img_all = torch.cat(img_embs).detach().requires_grad_()
    txt_all = torch.cat(txt_embs).detach().requires_grad_()
    loss = loss_fn(img_all, txt_all)
    backward(loss)
    if img_all.grad is None or txt_all.grad is None:
        raise ConfigError("the loss does not depend on both image and text embeddings")
    end_state = RngState()  # where one pass (encode, then loss) leaves the RNG

    passes = [(encode_images, c, s, g) for c, s, g in
              zip(image_chunks, img_states, img_all.grad.split([len(e) for e in img_embs]))]
    passes += [(encode_texts, c, s, g) for c, s, g in
               zip(text_chunks, txt_states, txt_all.grad.split([len(e) for e in txt_embs]))]
    for k, (encode, chunk, state, grad) in enumerate(passes):
        last = k == len(passes) - 1
        ctx = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with ctx:
            state.restore()
            emb = encode(chunk)
            if emb.requires_grad:  # a frozen tower has nothing to backpropagate into
                torch.autograd.backward(emb, grad_tensors=grad)
    end_state.restore()
    return loss.detach()


PairEncode = Callable[[Any], tuple[Tensor, Tensor]]
PairLoss = Callable[[Tensor, Tensor, list[Tensor]], Tensor]
Gather = Callable[[int, Tensor], Tensor]


def _chunk_backward(outputs: list[tuple[Tensor, Tensor | None]]) -> None:
    """Backpropagate cached gradients into whatever requires grad (a locked tower does not)."""
    pairs = [(o, g) for o, g in outputs if o.requires_grad and g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], grad_tensors=[g for _, g in pairs])


def gradcache_pairs(encode: PairEncode, chunks: Sequence[Any], loss_fn: PairLoss,
                    params: Sequence[Tensor] = (), *, backward: Backward | None = None,
                    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                    gather: Gather | None = None) -> Tensor:
    """Gradient caching where one forward encodes an (images, texts) chunk pair: the form
    DDP needs (both towers in every pass, so each synchronising pass uses every parameter).

    ``params`` (logit scale / bias) are used by the loss directly: the loss sees detached
    copies and their cached gradient is backpropagated in the last pass, the only one that
    synchronises gradients (``no_sync`` wraps the others): one all-reduce per step.
    ``gather(k, emb)`` turns chunk k's local embeddings into the global ones (all-gather
    with gradient under several processes); rows it drops get a zero gradient.
    """
    if len(chunks) == 0:
        raise ConfigError("gradient caching needs at least one chunk")
    backward = backward or _tensor_backward
    gather = gather or (lambda k, t: t)
    states, embs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState())
            embs.append([e.detach().requires_grad_() for e in encode(chunk)])
    leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
    img = torch.cat([gather(k, e[0]) for k, e in enumerate(embs)])
    txt = torch.cat([gather(k, e[1]) for k, e in enumerate(embs)])
    loss = loss_fn(img, txt, leaves)
    backward(loss)
    end_state = RngState()
    for k, (chunk, state) in enumerate(zip(chunks, states)):
        last = k == len(chunks) - 1
        ctx = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with ctx:
            state.restore()
            outputs = list(zip(encode(chunk), (e.grad for e in embs[k])))
            if last:
                outputs += [(p, leaf.grad) for p, leaf in zip(params, leaves)]
            _chunk_backward(outputs)
    end_state.restore()
    return loss.detach()


def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, a mapping of tensors (tokenizer output) or a list along dim 0."""
    if chunk_size < 1:
        raise ConfigError(f"gradcache chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, Mapping):
        parts = {k: split_batch(v, chunk_size) for k, v in batch.items()}
        n = len(next(iter(parts.values()))) if parts else 0
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    if isinstance(batch, Sequence):
        return [batch[i:i + chunk_size] for i in range(0, len(batch), chunk_size)]
    raise ConfigError(f"cannot split a batch of type {type(batch).__name__}")


class GradCache:
    """Gradient caching with fixed encoders and loss: ``GradCache(...).step(images, texts)``."""

    def __init__(self, encode_images: Callable[[Tensor], Tensor],
                 encode_texts: Callable[[Any], Tensor], loss_fn: LossFn, chunk_size: int,
                 backward: Backward | None = None,
                 no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
                 ) -> None:
        self.encode_images, self.encode_texts = encode_images, encode_texts
        self.loss_fn, self.chunk_size = loss_fn, chunk_size
        self.backward, self.no_sync = backward, no_sync

    def chunks(self, batch: Any) -> Iterator[Any]:
        yield from split_batch(batch, self.chunk_size)

    def step(self, images: Tensor, texts: Any) -> Tensor:
        """Split both sides into ``chunk_size`` chunks and run :func:`gradcache_step`."""
        return gradcache_step(self.encode_images, self.encode_texts, list(self.chunks(images)),
                              list(self.chunks(texts)), self.loss_fn, backward=self.backward,
                              no_sync=self.no_sync)
