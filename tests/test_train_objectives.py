"""Objectives: classify output in plain transformers, learning on generated data, LoRA,
partial unfreezing, hard negatives, SupCon and the thresholds saved in medsig.json."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medsig.data.collection import load_collection
from medsig.errors import ConfigError
from medsig.train import train
from medsig.train.adapt import adapt_model
from medsig.train.config import AdaptConfig, LoraSettings
from medsig.train.contrastive import hard_negative_batches
from tests.test_train_helpers import (  # noqa: F401 (fixtures)
    config,
    templated_spec,
    tiny_fixture,
    wound_fixture,
)


def _info(out: Path) -> dict:
    return json.loads((out / "medsig.json").read_text())


def _val_pixels(spec: Path, out: Path) -> tuple[list[int], torch.Tensor]:
    """Val images preprocessed by the saved image processor (what a user would do)."""
    from transformers import AutoImageProcessor

    from medsig.data.images import load_image

    processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=True)
    val = load_collection(spec).select_split("val")
    images = [load_image(p) for p in val.image_paths]
    return list(range(len(val))), processor(images=images, return_tensors="pt")["pixel_values"]


def test_classify_learns_and_loads_in_plain_transformers(wound: Path, tiny: Path,
                                                          tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForImageClassification

    from medsig.train.checkpoint import load_weights
    from medsig.train.classify import build_heads, load_classifier

    labels = ["erythema", "infection_risk"]
    start = time.perf_counter()
    out = train(config(wound, tiny, tmp_path / "clf", objective="classify", labels=labels,
                       optim={"epochs": 20, "batch_size": 16, "lr": 3e-3},
                       data={"augment": True, "class_balanced": True},
                       eval={"thresholds": {"erythema": 0.9}}))
    seconds = time.perf_counter() - start
    info = _info(out)
    before = info["metrics"]["start"]["val/macro_auc"]
    after = info["metrics"]["val"]["val/macro_auc"]
    print(f"classify: val macro AUC {before:.3f} -> {after:.3f} in {seconds:.1f} s")
    assert after >= before + 0.15 and after >= 0.7

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "erythema:erythema", 1: "infection_risk:Low",
                                     2: "infection_risk:Medium", 3: "infection_risk:High"}
    assert model.config.problem_type == "multi_label_classification"
    heads = {h["name"]: h for h in info["heads"]}
    assert heads["erythema"]["offset"] == 0 and heads["infection_risk"]["size"] == 3
    assert heads["erythema"]["threshold_rule"] == "sensitivity>=0.9"
    assert heads["infection_risk"]["thresholds"] == []

    _, pixels = _val_pixels(wound, out)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    # the same logits as the trained weights (best checkpoint) in a model built by medsig
    collection = load_collection(wound)
    rebuilt = load_classifier(str(tiny), build_heads(collection, labels))
    load_weights(out / "checkpoints" / "best", rebuilt)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(pixel_values=pixels).logits, logits)
    # and the val metric / threshold recomputed from plain transformers outputs agree
    y = collection.select_split("val").labels["erythema"].targets
    p = torch.sigmoid(logits[:, 0]).numpy()
    ok = y >= 0
    auc = roc_auc_score(y[ok], p[ok])
    assert auc == pytest.approx(info["metrics"]["val"]["val/auc/erythema"], abs=1e-5)
    threshold = heads["erythema"]["thresholds"][0]
    sensitivity = float((p[ok][y[ok] == 1] >= threshold).mean())
    assert sensitivity >= 0.9


def test_contrastive_learns_on_generated_wounds(wound: Path, tiny: Path,
                                                tmp_path: Path) -> None:
    spec = templated_spec(wound, tmp_path)
    start = time.perf_counter()
    out = train(config(spec, tiny, tmp_path / "con", labels=["erythema", "healing"],
                       optim={"epochs": 20, "batch_size": 16, "lr": 3e-3},
                       data={"augment": True}))
    seconds = time.perf_counter() - start
    metrics = _info(out)["metrics"]
    before, after = metrics["start"], metrics["val"]
    print(f"contrastive: val recall@1 {before['val/recall@1']:.3f} -> "
          f"{after['val/recall@1']:.3f}, NMI {before['val/nmi']:.3f} -> {after['val/nmi']:.3f}"
          f", loss {before['val/loss']:.3f} -> {after['val/loss']:.3f} in {seconds:.1f} s")
    assert after["val/recall@1"] >= before["val/recall@1"] + 0.15
    assert after["val/loss"] < before["val/loss"]


def test_contrastive_options_run(wound: Path, tiny: Path, tmp_path: Path) -> None:
    """Multi-positive sigmoid + SupCon + hard negatives + gradient caching + loss chunks."""
    out = train(config(wound, tiny, tmp_path / "opts", labels=["erythema"],
                       optim={"epochs": 2, "batch_size": 8, "grad_accum": 2, "gradcache": True},
                       contrastive={"loss": "multi_positive_sigmoid", "positives": "same_class",
                                    "supcon_weight": 0.1, "hard_negatives": True,
                                    "chunk_size": 4}))
    info = _info(out)
    assert info["training"]["steps"] == 2 * (208 // 16)
    with (out / "log.csv").open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert len(losses) == info["training"]["steps"] and all(map(math.isfinite, losses))


def test_lora_adapter_equals_merged_weights(wound: Path, tiny: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    outs = {}
    for merge in (False, True):
        outs[merge] = train(config(wound, tiny, tmp_path / f"lora-{merge}", labels=["erythema"],
                                   optim={"epochs": 1, "batch_size": 16, "lr": 1e-2},
                                   adapt={"method": "lora", "lora": {"r": 4, "merge": merge}}))
    assert (outs[False] / "adapter_config.json").is_file()
    assert not (outs[False] / "model.safetensors").exists()
    assert not (outs[True] / "adapter_config.json").exists()
    assert _info(outs[True])["training"]["adapt"]["trainable"] < \
        _info(outs[True])["training"]["adapt"]["total"] / 5

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def feats(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval().get_image_features(pixel_values=pixels).pooler_output

    adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny), outs[False])
    unmerged = feats(adapter)
    merged_in_memory = feats(adapter.merge_and_unload())
    merged_on_disk = feats(AutoModel.from_pretrained(outs[True]))
    auto_adapter = feats(AutoModel.from_pretrained(outs[False]))  # transformers + peft
    base = feats(AutoModel.from_pretrained(tiny))
    torch.testing.assert_close(merged_in_memory, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_on_disk, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(auto_adapter, unmerged, rtol=0, atol=1e-6)
    assert (base - unmerged).abs().max() > 1e-3  # the adapter did train


def test_partial_unfreeze_and_locked_towers(tiny: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny)
    _, report = adapt_model(model, AdaptConfig(method="partial", unfreeze_last_n_layers=1,
                                               lock_text=True))
    print(report)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_model.") for n in trainable)
    layers = len(model.vision_model.encoder.layers)
    last = f"vision_model.encoder.layers.{layers - 1}."
    assert any(n.startswith(last) for n in trainable)
    assert not any(n.startswith("vision_model.embeddings.") for n in trainable)
    assert not any(n.startswith(f"vision_model.encoder.layers.{i}.")
                   for i in range(layers - 1) for n in trainable)
    assert "vision_model.post_layernorm.weight" in trainable
    assert 0 < report.trainable < report.total
    image_only, _ = adapt_model(AutoModel.from_pretrained(tiny), AdaptConfig(lock_text=True))
    assert all(p.requires_grad == (not n.startswith(("text_model.", "text_projection")))
               for n, p in image_only.named_parameters())
    with pytest.raises(ConfigError, match="adapt.lora.target_modules"):
        adapt_model(AutoModel.from_pretrained(tiny),
                    AdaptConfig(method="lora", lora=LoraSettings(target_modules=["nope"])))


def test_hard_negative_batches_group_anchors_with_their_negatives() -> None:
    pool = np.arange(40)
    neighbours = {i: [(i + 20) % 40, (i + 21) % 40] for i in range(40)}
    batches = hard_negative_batches(pool, neighbours, step_size=8, seed=0, drop_last=False)
    assert sorted(r for b in batches for r in b) == list(range(40))  # every row once
    together = sum(1 for b in batches for r in b if neighbours[r][0] in b)
    assert together >= 20  # most rows share their batch with their hardest negative
    random_batches = [list(range(i, i + 8)) for i in range(0, 40, 8)]
    assert sum(1 for b in random_batches for r in b if neighbours[r][0] in b) == 0


def test_checkpoint_weights_are_finite_and_match_the_export(wound: Path, tiny: Path,
                                                            tmp_path: Path) -> None:
    out = train(config(wound, tiny, tmp_path / "c", labels=["erythema"],
                       optim={"epochs": 2, "batch_size": 16, "lr": 1e-3},
                       contrastive={"loss": "softmax", "positives": "same_class"},
                       eval={"best_metric": "val/loss"}))
    info = _info(out)
    assert info["metrics"]["best"]["mode"] == "min"
    assert info["prompts"]["erythema"].keys() == {"no erythema", "erythema"}
    best = load_file(str(out / "checkpoints/best/trainable.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    for k, v in best.items():
        assert torch.isfinite(v).all()
        assert torch.equal(saved[k], v), k
    assert math.isfinite(info["metrics"]["val"]["val/nmi"])
    assert (out / "README.md").read_text().count("no diagnostic claim") == 1
