"""Contrastive / SupCon / masked BCE losses against transformers and hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from medsig.errors import ConfigError
from medsig.train.losses import (
    CONTRASTIVE_LOSSES,
    get_loss,
    loss_peak_memory,
    masked_bce_loss,
    pos_weight_from_targets,
    positives_from_labels,
    sigmoid_loss,
    softmax_loss,
    supcon_loss,
)

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=64)


def _emb(n: int, d: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1).requires_grad_()


def _hf_outputs(model_cls: type, config: object, n: int = 6) -> tuple[object, object]:
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ids = torch.randint(3, 100, (n, 16))
    pixels = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    return model, out


def test_sigmoid_matches_transformers_siglip() -> None:
    model, out = _hf_outputs(SiglipModel, SiglipConfig(text_config=TEXT, vision_config=VISION))
    kw = dict(logit_scale=model.logit_scale.detach(), logit_bias=model.logit_bias.detach())
    img, txt = out.image_embeds, out.text_embeds
    plain = sigmoid_loss(img, txt, **kw)
    all_different = positives_from_labels(torch.arange(len(img)))
    multi = CONTRASTIVE_LOSSES["multi_positive_sigmoid"](img, txt, positives=all_different, **kw)
    torch.testing.assert_close(plain, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(multi, out.loss, rtol=1e-5, atol=1e-6)
    # a shared class makes the off-diagonal pair a positive: the loss changes
    shared = positives_from_labels(torch.tensor([0, 0, 1, 2, 3, 4]))
    assert not torch.isclose(sigmoid_loss(img, txt, positives=shared, **kw), out.loss)


def test_sigmoid_multi_positive_formula() -> None:
    img, txt = _emb(7, seed=1), _emb(7, seed=2)
    pos = positives_from_labels(torch.tensor([0, 1, 0, 2, 1, -1, -1]))
    got = sigmoid_loss(img, txt, logit_scale=torch.tensor(1.5), logit_bias=torch.tensor(-2.0),
                       positives=pos)
    logits = img @ txt.T * math.exp(1.5) - 2.0
    labels = pos.double() * 2 - 1
    expected = -F.logsigmoid(labels * logits).sum(1).mean()
    torch.testing.assert_close(got, expected)


def _clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float,
                    pos: torch.Tensor | None = None) -> torch.Tensor:
    logits = img @ txt.T * math.exp(scale)
    if pos is None:
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    p = pos.to(logits.dtype)
    i2t = -(p / p.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(p.T / p.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def test_softmax_matches_clip() -> None:
    model, out = _hf_outputs(CLIPModel, CLIPConfig(text_config=TEXT, vision_config=VISION))
    img, txt = out.image_embeds, out.text_embeds
    got = softmax_loss(img, txt, logit_scale=model.logit_scale.detach(),
                       logit_bias=torch.tensor(5.0))  # bias is ignored
    torch.testing.assert_close(got, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _clip_reference(img, txt, model.logit_scale.item()))


def test_softmax_soft_targets_with_duplicates() -> None:
    img, txt = _emb(8, seed=3), _emb(8, seed=4)
    texts = ["a", "b", "a", "c", "d", "b", "e", "a"]
    pos = positives_from_labels(None, "identical_text", texts=texts)
    soft = softmax_loss(img, txt, logit_scale=torch.tensor(2.0), positives=pos)
    hard = softmax_loss(img, txt, logit_scale=torch.tensor(2.0))
    torch.testing.assert_close(soft, _clip_reference(img, txt, 2.0, pos))
    torch.testing.assert_close(hard, _clip_reference(img, txt, 2.0))
    assert abs(soft.item() - hard.item()) > 1e-3


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("with_positives", [False, True])
def test_chunked_equals_unchunked(name: str, with_positives: bool) -> None:
    img, txt = _emb(37, seed=5), _emb(37, seed=6)
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    pos = positives_from_labels(torch.arange(37) % 5) if with_positives else None
    params = [img, txt, scale] + ([bias] if name == "sigmoid" else [])
    results = []
    for chunk in (None, 5, 16):
        loss = get_loss(name)(img, txt, logit_scale=scale, logit_bias=bias, positives=pos,
                              chunk_size=chunk)
        results.append((loss, torch.autograd.grad(loss, params)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_chunked_frozen_inputs_and_bad_chunk() -> None:
    img, txt = _emb(10, seed=7), _emb(10, seed=8).detach()
    loss = sigmoid_loss(img, txt, logit_scale=torch.tensor(1.0), chunk_size=3)
    (g,) = torch.autograd.grad(loss, [img])
    (ref,) = torch.autograd.grad(sigmoid_loss(img, txt, logit_scale=torch.tensor(1.0)), [img])
    torch.testing.assert_close(g, ref)
    with pytest.raises(ConfigError):
        sigmoid_loss(img, txt, logit_scale=torch.tensor(1.0), chunk_size=0)


def test_chunking_bounds_memory() -> None:
    full = loss_peak_memory(1024, 32, None)
    chunked = loss_peak_memory(1024, 32, 64)
    assert full >= 4 * 1024 * 1024 * 4  # several n x n float32 matrices
    assert chunked < full / 3


def test_positives_from_labels() -> None:
    same = positives_from_labels(torch.tensor([0, 1, 0, -1, -1]))
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                             [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same, expected)
    multi = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 1, 0], [-1, -1, -1], [0, 0, 0]])
    shared = positives_from_labels(multi.numpy(), "any_shared")
    assert shared[0, 1] and shared[1, 0] and not shared[0, 2] and not shared[2, 1]
    assert shared[3, 3] and shared[4, 4] and shared[3].sum() == 1 and shared[4].sum() == 1
    texts = positives_from_labels(None, "identical_text", texts=["x", "y", "x"])
    assert texts.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    with pytest.raises(ConfigError, match="unknown positives mode"):
        positives_from_labels([0, 1], "nearest")
    with pytest.raises(ConfigError, match="needs texts"):
        positives_from_labels(None, "identical_text")


def test_supcon_matches_loop() -> None:
    emb = _emb(9, seed=9)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, -1, 2])  # 3 and -1: anchors without positive
    tau = 0.2
    sim = emb @ emb.T / tau
    terms = []
    for i in range(9):
        pos = [p for p in range(9) if p != i and labels[p] == labels[i] and labels[i] >= 0]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([sim[i, a] for a in range(9) if a != i]), 0)
        terms.append(-torch.stack([sim[i, p] - denom for p in pos]).mean())
    expected = torch.stack(terms).mean()
    got = supcon_loss(emb, labels, temperature=tau)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(supcon_loss(emb, labels, temperature=tau, chunk_size=4), expected)
    none = supcon_loss(emb, torch.arange(9))
    assert none.item() == 0.0 and none.requires_grad


def test_masked_bce_ignores_missing() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[1, 0, -1], [0, -1, 1], [-1, 0, 0], [1, 1, -1]], dtype=torch.float32)
    logits = torch.randn(4, 3, generator=g).requires_grad_()
    pw = torch.tensor([2.0, 0.5, 3.0])
    loss = masked_bce_loss(logits, targets, pw)
    (grad,) = torch.autograd.grad(loss, [logits])
    missing = targets == -1
    assert torch.all(grad[missing] == 0)
    moved = (logits.detach() + 50.0 * missing).requires_grad_()
    loss2 = masked_bce_loss(moved, targets, pw)
    (grad2,) = torch.autograd.grad(loss2, [moved])
    assert loss2.item() == loss.item() and torch.equal(grad2, grad)
    # reference: torch's BCEWithLogitsLoss(pos_weight) on each column's valid entries
    total = sum(torch.nn.BCEWithLogitsLoss(pos_weight=pw[j:j + 1], reduction="sum")(
        logits[~missing[:, j], j], targets[~missing[:, j], j]) for j in range(3))
    torch.testing.assert_close(loss, total / (~missing).sum())


def test_masked_bce_all_missing_and_binary() -> None:
    logits = torch.randn(3, 2, requires_grad=True)
    loss = masked_bce_loss(logits, -torch.ones(3, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    x = torch.tensor([0.3, -1.2, 2.0, 0.1])
    y = torch.tensor([1.0, -1.0, 0.0, 1.0])
    ref = F.binary_cross_entropy_with_logits(x[y >= 0], y[y >= 0])
    torch.testing.assert_close(masked_bce_loss(x, y), ref)


def test_pos_weight_from_targets() -> None:
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [0, -1, 1], [-1, 0, 1], [0, 0, 1]])
    pw = pos_weight_from_targets(targets)
    # label 0: 3 neg / 1 pos; label 1: 4 neg / no positive (clamped to 1); label 2: 1 neg / 4 pos
    torch.testing.assert_close(pw, torch.tensor([3.0, 4.0, 0.25]))
    assert pos_weight_from_targets(torch.tensor([1, 0, 0, 0, 0, -1])).tolist() == [4.0]
    assert pos_weight_from_targets(torch.zeros(500, 1), max_weight=100.0).tolist() == [100.0]


def test_get_loss() -> None:
    assert get_loss("softmax") is softmax_loss
    assert get_loss("multi_positive_sigmoid") is sigmoid_loss
    with pytest.raises(ConfigError, match="unknown loss 'triplet'"):
        get_loss("triplet")
