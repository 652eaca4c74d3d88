"""The training loop: exact resume, NaN handling, clear errors, gradient caching, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsig.errors import ConfigError
from medsig.train import train
from tests.test_train_helpers import (  # noqa: F401 (fixtures)
    config,
    no_label_spec,
    tiny_fixture,
    wound_fixture,
)


def _losses(out: Path) -> list[float]:
    with (out / "log.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_ends_with_the_same_weights(wound: Path, tiny: Path, tmp_path: Path,
                                           workers: int) -> None:
    # augmentation and a random template per epoch: every random choice must be replayed,
    # in the training process or in a loader process that lives for the whole run
    cfg = dict(optim={"epochs": 2, "batch_size": 32, "lr": 1e-3}, num_workers=workers,
               data={"augment": True, "text": "templates"}, eval={"save_every_steps": 2})
    full = train(config(wound, tiny, tmp_path / "full", **cfg))

    class Stop(Exception):
        pass

    def stop_at_9(info: dict) -> None:
        if info["step"] == 9:  # mid epoch 2 (6 steps per epoch), after the step-8 checkpoint
            raise Stop

    part = config(wound, tiny, tmp_path / "part", **cfg)
    with pytest.raises(Stop):
        train(part, callback=stop_at_9)
    state = json.loads((tmp_path / "part/checkpoints/last/state.json").read_text())
    assert state["step"] == 8 and state["epoch"] == 1 and state["batch"] == 2
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(part)
    resumed = train(part, resume=True)

    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full) == _losses(resumed) and len(_losses(full)) == 12
    info_a = json.loads((full / "medsig.json").read_text())
    info_b = json.loads((resumed / "medsig.json").read_text())
    assert info_a["metrics"]["val"] == info_b["metrics"]["val"]
    changed = config(wound, tiny, tmp_path / "part", **{**cfg, "optim": {**cfg["optim"],
                                                                         "lr": 1e-4}})
    with pytest.raises(ConfigError, match=r"cannot resume with a different 'optim.lr'"):
        train(changed, resume=True)


def test_early_stopping(wound: Path, tiny: Path, tmp_path: Path) -> None:
    # "max" on a loss: it stops at the first evaluation whose loss does not rise
    out = train(config(wound, tiny, tmp_path / "es", optim={"epochs": 6, "batch_size": 32},
                       eval={"best_metric": "val/loss", "best_mode": "max", "patience": 1}))
    info = json.loads((out / "medsig.json").read_text())
    assert info["training"]["stopped_early"] is True
    # patience 1: training stops at the first evaluation that does not beat the best so far
    with (out / "log.csv").open() as f:
        evals = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f)
                 if r.get("val/loss") and int(r["epoch"]) > 0]
    best_step, best = evals[0]
    for step, loss in evals[1:]:
        if loss <= best:  # "max": no improvement
            break
        best_step, best = step, loss
    assert info["training"]["steps"] == step < 6 * 6
    assert info["training"]["planned_steps"] == 6 * 6
    assert info["metrics"]["best"]["step"] == best_step


def test_epoch_pool_oversamples_and_balances(wound: Path) -> None:
    from collections import Counter

    from medsig.data.collection import load_collection
    from medsig.train.config import load_config
    from medsig.train.data import epoch_pool, epoch_texts, single_class

    train_rows = load_collection(wound).select_split("train")
    base = {"spec": str(wound), "model": "m", "out": "o"}
    counts = Counter(train_rows.labels["infection_risk"].targets.tolist())
    rare = min(counts[c] for c in (0, 1, 2))
    cfg = load_config(base, [f"data.oversample={{label: infection_risk, min_count: {rare + 20}}}"])
    pool = epoch_pool(train_rows, cfg, ["infection_risk"], 0)
    after = Counter(train_rows.labels["infection_risk"].targets[pool].tolist())
    assert min(after[c] for c in (0, 1, 2)) >= rare + 20 and len(pool) > len(train_rows)

    cfg = load_config(base, ["data.class_balanced=true", "data.balance_label=infection_risk"])
    cls = single_class(train_rows, "infection_risk")[epoch_pool(train_rows, cfg, [], 0)]
    shares = [float((cls == c).mean()) for c in (0, 1, 2)]
    print("class-balanced shares", shares, "raw", dict(counts))
    assert max(shares) - min(shares) < 0.15

    cfg = load_config(base, ["data.text=templates"])
    e0, e1 = epoch_texts(train_rows, cfg, 0), epoch_texts(train_rows, cfg, 1)
    assert e0 == epoch_texts(train_rows, cfg, 0) and e0 != e1  # seeded, new each epoch
    assert not any(t.startswith("POD ") for t in e0)  # templates, not the descriptions


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(wound: Path, tiny: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "nan"
    cfg = config(wound, tiny, out, objective="classify", optim={"lr": 1e30, "epochs": 2},
                 eval={"save_every_steps": 1})
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    print(message)
    assert "the loss became nan" in message and "last good checkpoint" in message
    assert "\n" not in message
    state = json.loads((out / "checkpoints/last/state.json").read_text())
    failed_at = int(message.split(" at step ")[1].split()[0])
    # the kept checkpoint's weights produced a finite loss (they predate the diverged ones)
    assert state["step"] < failed_at - 1
    weights = load_file(str(out / "checkpoints/last/trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "medsig.json").exists()


def test_absent_labels_give_a_clear_error(wound: Path, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"label\(s\) nope not in the spec \(labels: healing"):
        train(config(wound, tiny, tmp_path / "a", objective="classify", labels=["nope"]))
    bare = no_label_spec(wound, tmp_path)
    with pytest.raises(ConfigError, match="objective 'classify' needs labels"):
        train(config(bare, tiny, tmp_path / "b", objective="classify", labels=None))
    with pytest.raises(ConfigError, match="positives 'same_class' needs a label"):
        train(config(bare, tiny, tmp_path / "c", labels=None,
                     contrastive={"loss": "softmax", "positives": "same_class"}))


def test_gradcache_loss_matches_one_big_batch(wound: Path, tiny: Path, tmp_path: Path) -> None:
    runs = {}
    for name, batch, accum, cache in (("cached", 8, 2, True), ("big", 16, 1, False)):
        runs[name] = train(config(wound, tiny, tmp_path / name, eval={"at_start": False},
                                  optim={"max_steps": 1, "batch_size": batch,
                                         "grad_accum": accum, "gradcache": cache,
                                         "warmup_ratio": 0.0, "lr": 1e-3}))
    cached, big = _losses(runs["cached"]), _losses(runs["big"])
    print(f"step-1 loss: gradcache 8x2 {cached[0]:.6f}, one batch of 16 {big[0]:.6f}")
    assert cached[0] == pytest.approx(big[0], rel=1e-5)
    a, b = _weights(runs["cached"]), _weights(runs["big"])
    for k in a:  # one AdamW step of lr 1e-3 moves each weight by ~1e-3: allow 1% of it
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_cli_trains_with_direct_flags(wound: Path, tiny: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsig.train.cli import train_app

    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["classify", "--spec", str(wound), "--model", str(tiny), "--out", str(out),
            "--set", "max_steps=2", "--set", "device=cpu", "--set", "labels=erythema"]
    result = runner.invoke(train_app, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "medsig.json").read_text())
    assert info["objective"] == "classify" and info["training"]["steps"] == 2
    assert [h["name"] for h in info["heads"]] == ["erythema"]
    assert math.isfinite(info["metrics"]["val"]["val/macro_auc"])
    bad = runner.invoke(train_app, ["classify", "--spec", str(wound), "--model", str(tiny),
                                    "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"])
    assert isinstance(bad.exception, ConfigError) and "optim.lrr" in str(bad.exception)
