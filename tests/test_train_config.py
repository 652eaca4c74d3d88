"""Training config: YAML + overrides, unknown keys and bad values give one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsig.errors import ConfigError
from medsig.train.config import TrainConfig, load_config


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_yaml_nested_flat_keys_and_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
spec: data/spec.yaml
model: google/siglip-base-patch16-224
out: runs/a
objective: classify
labels: [urgency, erythema]
optim: {lr: 2.0e-5, batch_size: 8}
r: 4                  # flat key: adapt.lora.r
adapt: {method: lora, lora: {alpha: 8}}
eval: {thresholds: {urgency: 0.9}}
""")
    cfg = load_config(path, ["optim.lr=1e-4", "grad_accum=4", "lora.target_modules=q_proj,k_proj",
                             "eval.patience=3", "max_steps=null"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.spec == str((tmp_path / "data/spec.yaml").resolve())
    assert cfg.out == str((tmp_path / "runs/a").resolve())
    assert cfg.model == "google/siglip-base-patch16-224"  # not a local path: a hub id
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert (cfg.optim.batch_size, cfg.optim.grad_accum) == (8, 4)
    assert cfg.adapt.lora.r == 4 and cfg.adapt.lora.alpha == 8
    assert cfg.adapt.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.eval.thresholds == {"urgency": 0.9} and cfg.eval.patience == 3
    assert cfg.metric == "val/macro_auc" and cfg.mode == "max"
    # a TrainConfig round-trips through load_config
    assert load_config(cfg).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("raw", "overrides", "needle"), [
    ({"optim": {"lrr": 1}}, None, "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ({}, ["learning_rate=1"], "unknown config key 'learning_rate'"),
    ({}, ["adapt.lora.rank=4"], "unknown config key 'adapt.lora.rank'"),
    ({"optim": {"lr": "fast"}}, None, "'optim.lr' must be a number, got 'fast'"),
    ({"objective": "segment"}, None, "'objective' must be one of contrastive, classify, probe"),
    ({"adapt": {"method": "partial"}}, None, "needs adapt.unfreeze_last_n_layers"),
    ({"unfreeze_last_n_layers": 2}, None, "need adapt.method: partial"),
    ({"eval": {"thresholds": {"urgency": 1.5}}}, None, "eval.thresholds.urgency"),
    ({}, ["batch_size"], "expected key=value"),
])
def test_bad_config_names_the_key(raw: dict, overrides: list[str] | None, needle: str) -> None:
    base = {"spec": "s.yaml", "model": "m", "out": "o", **raw}
    with pytest.raises(ConfigError) as info:
        load_config(base, overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "spec: s.yaml\nmodel: m\nout: o\ndata: {augmentation: true}\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: unknown config key 'data\.augmentation'"):
        load_config(path)


def test_required_keys() -> None:
    with pytest.raises(ConfigError, match="'spec' is required"):
        load_config({"model": "m", "out": "o"})


def test_short_keys_and_mapping_entries():
    from medsig.train.config import load_config

    cfg = load_config({"spec": "s.yaml", "model": "m", "out": "o"},
                      ["lr=1e-4", "epochs=3", "eval.thresholds.urgent=0.9",
                       "probe.mlp_epochs=7"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.epochs == 3 and cfg.probe.mlp_epochs == 7
    assert cfg.eval.thresholds == {"urgent": 0.9}
    with pytest.raises(ConfigError, match="did you mean 'eval.thresholds'"):
        load_config({"spec": "s.yaml", "model": "m", "out": "o"}, ["eval.thresholdz.urgent=1"])


def test_defaults_by_starting_point(tmp_path: Path) -> None:
    """A medsig random checkpoint (and a folder trained from one) gets the from-scratch
    defaults; a hub id the fine-tuning ones; explicit values and `init` win."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "medsig_tiny.json").write_text("{}")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "medsig.json").write_text(f'{{"base_model": "{tiny}"}}')
    base = {"spec": "s.yaml", "out": "o"}
    for model in (tiny, tuned):
        cfg = load_config({**base, "model": str(model)})
        assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_ratio) == (1e-3, 20, 0.05)
        assert cfg.init_note.startswith("starting point: random")
    hub = load_config({**base, "model": "google/siglip-base-patch16-224"})
    assert (hub.optim.lr, hub.optim.epochs, hub.optim.warmup_ratio) == (1e-5, 5, 0.1)
    assert "starting point: pretrained" in hub.init_note and "lr 1e-05" in hub.init_note
    forced = load_config({**base, "model": str(tiny), "init": "pretrained"}, ["lr=3e-4"])
    assert (forced.optim.lr, forced.optim.epochs) == (3e-4, 5)
    assert "lr 0.0003 (set)" in forced.init_note
    again = load_config(forced)  # a resolved config keeps its values and its note
    assert again.optim.lr == 3e-4 and again.init_note == forced.init_note
    with pytest.raises(ConfigError, match="'init' must be one of auto, random, pretrained"):
        load_config({**base, "model": "m", "init": "scratch"})
