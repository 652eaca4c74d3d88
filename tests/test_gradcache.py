"""Gradient caching gives the full-batch loss and gradients; naive accumulation does not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipConfig, SiglipModel

from medsig.errors import ConfigError
from medsig.train.gradcache import GradCache, gradcache_step, split_batch
from medsig.train.losses import get_loss


class Towers(nn.Module):
    """Two small MLP encoders (optionally with dropout) and SigLIP's scale / bias."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(dropout),
                                   nn.Linear(32, 16))
        self.text = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(32, 16))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_texts(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(x), dim=-1)


def _loss_fn(model: nn.Module, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    loss = get_loss(name)
    return lambda i, t: loss(i, t, logit_scale=model.logit_scale, logit_bias=model.logit_bias)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=g), torch.randn(32, 10, generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _noisy_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss that also draws from the RNG (like sampling extra negatives would)."""
    loss = _loss_fn(model, "sigmoid")
    return lambda i, t: loss(i, t) + 0.0 * torch.rand(5).sum()


def _reference(model: nn.Module, images: torch.Tensor, texts: torch.Tensor, chunk: int,
               seed: int) -> torch.Tensor:
    """Full-batch loss, encoding chunk by chunk with grad in gradcache's RNG order."""
    torch.manual_seed(seed)
    img = torch.cat([model.encode_images(c) for c in images.split(chunk)])
    txt = torch.cat([model.encode_texts(c) for c in texts.split(chunk)])
    loss = _noisy_loss(model)(img, txt)
    loss.backward()
    return loss.detach()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_gradcache_equals_big_batch(name: str) -> None:
    torch.manual_seed(0)
    model = Towers()
    images, texts = _batch()
    loss_ref = _loss_fn(model, name)(model.encode_images(images), model.encode_texts(texts))
    loss_ref.backward()
    ref = _grads(model)
    cache = GradCache(model.encode_images, model.encode_texts, _loss_fn(model, name), 8)
    loss = cache.step(images, texts)
    got = _grads(model)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    _assert_same(got, ref)
    # naive accumulation: the mean of per-chunk losses is another objective
    naive = torch.stack([_loss_fn(model, name)(model.encode_images(i), model.encode_texts(t))
                         for i, t in zip(images.split(8), texts.split(8))]).mean()
    naive.backward()
    assert abs(naive.item() - loss.item()) > 0.05
    assert (_grads(model)["image.0.weight"] - ref["image.0.weight"]).abs().max() > 1e-3


def test_gradcache_replays_dropout_masks() -> None:
    torch.manual_seed(0)
    model = Towers(dropout=0.3).train()
    images, texts = _batch(1)
    assert not torch.equal(model.encode_images(images), model.encode_images(images))
    loss_ref = _reference(model, images, texts, 8, seed=123)
    after_ref = torch.rand(3)
    ref = _grads(model)
    torch.manual_seed(123)
    loss = gradcache_step(model.encode_images, model.encode_texts, list(images.split(8)),
                          list(texts.split(8)), _noisy_loss(model))
    # the RNG ends where one pass (encode every chunk, then the loss) would have left it
    assert torch.equal(torch.rand(3), after_ref)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    _assert_same(_grads(model), ref)


def test_gradcache_tiny_siglip_with_attention_dropout() -> None:
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=16, attention_dropout=0.2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, attention_dropout=0.2))
    model = SiglipModel(config).train()

    def enc_img(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)

    def enc_txt(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(model.get_text_features(**batch).pooler_output, dim=-1)

    pixels = torch.randn(32, 3, 32, 32)
    ids = torch.randint(0, 100, (32, 16))
    torch.manual_seed(7)
    img = torch.cat([enc_img(c) for c in pixels.split(8)])
    txt = torch.cat([enc_txt({"input_ids": c}) for c in ids.split(8)])
    loss_ref = _loss_fn(model, "sigmoid")(img, txt)
    loss_ref.backward()
    ref = _grads(model)
    torch.manual_seed(7)
    cache = GradCache(enc_img, enc_txt, _loss_fn(model, "sigmoid"), chunk_size=8)
    loss = cache.step(pixels, {"input_ids": ids})
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    _assert_same(_grads(model), ref)


def test_gradcache_with_accelerator_backward_and_frozen_text() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = Towers()
    model.text.requires_grad_(False)
    images, texts = _batch(2)
    _loss_fn(model, "sigmoid")(model.encode_images(images), model.encode_texts(texts)).backward()
    ref = _grads(model)
    assert "text.0.weight" not in ref
    gradcache_step(model.encode_images, model.encode_texts, list(images.split(8)),
                   list(texts.split(8)), _loss_fn(model, "sigmoid"),
                   backward=accelerator.backward)
    # accelerate divides the loss by the accumulation steps once, for every parameter
    _assert_same({k: 2 * v for k, v in _grads(model).items()}, ref)


def test_split_batch_and_errors() -> None:
    parts = split_batch({"input_ids": torch.arange(10)[:, None],
                         "attention_mask": torch.ones(10, 1)}, 4)
    assert [len(p["input_ids"]) for p in parts] == [4, 4, 2]
    assert torch.equal(parts[2]["input_ids"][:, 0], torch.tensor([8, 9]))
    assert split_batch(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    with pytest.raises(ConfigError):
        split_batch(torch.zeros(3), 0)
    with pytest.raises(ConfigError):
        gradcache_step(lambda x: x, lambda x: x, [], [], lambda i, t: i.sum())
