"""Probes on frozen embeddings and the Predictor that serves every model kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsig.data.images import load_image
from medsig.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny

    root = tmp_path_factory.mktemp("probe")
    spec = synthesize("wound", root / "data", n=160, seed=1, image_size=48)
    tiny = write_tiny(root / "tiny", arch="siglip", image_size=32, seed=0)
    return root, spec, tiny


def _pixels(predictor, paths):
    return torch.stack([predictor.preprocess(load_image(p)) for p in paths])


def test_logistic_probe_round_trip_torch_and_sklearn(setup):
    import joblib

    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor
    from medsig.train.probe import train_probe

    root, spec, tiny = setup
    out = train_probe(spec, tiny, root / "logistic", eval={"thresholds": {"urgency": 0.9}})
    meta = json.loads((out / "medsig.json").read_text())
    assert meta["objective"] == "probe" and meta["split"]["note"]  # split made on the fly
    heads = {h["name"]: h for h in meta["heads"]}
    assert heads["urgency"]["threshold_rule"] == "sensitivity>=0.9"
    assert heads["infection_risk"]["thresholds"] == []  # multiclass: argmax decides
    assert 0 <= meta["metrics"]["val"]["val/macro_auc"] <= 1

    predictor = load_predictor(out)
    paths = load_collection(spec).image_paths[:6]
    probs = predictor.predict_pixels(_pixels(predictor, paths))
    assert probs.shape == (6, meta["probe"]["outputs"])
    mc = heads["infection_risk"]
    assert np.allclose(probs[:, mc["offset"]:mc["offset"] + mc["size"]].sum(1), 1, atol=1e-5)

    # plain scikit-learn reproduces the probabilities from the saved estimators
    saved = joblib.load(out / "probe.joblib")
    emb = predictor.embed(_pixels(predictor, paths))
    x = (emb - saved["mean"]) / saved["std"]
    urgency = saved["estimators"]["urgency"][0].predict_proba(x)[:, 1]
    probs = predictor.raw_probabilities(_pixels(predictor, paths))  # before temperatures
    assert np.allclose(urgency, probs[:, heads["urgency"]["offset"]], atol=1e-4)
    risk = saved["estimators"]["infection_risk"][0].predict_proba(x)
    assert np.allclose(risk, probs[:, mc["offset"]:mc["offset"] + mc["size"]], atol=1e-4)


def test_mlp_probe_masks_missing_and_loads(setup):
    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor
    from medsig.train.probe import train_probe

    root, spec, tiny = setup
    out = train_probe(spec, tiny, root / "mlp", probe={"kind": "mlp", "mlp_epochs": 50,
                                                       "hidden": [24, 12]})
    meta = json.loads((out / "medsig.json").read_text())
    assert meta["probe"]["kind"] == "mlp" and meta["probe"]["hidden"] == [24, 12]
    from safetensors.torch import load_file

    shapes = [tuple(v.shape) for k, v in sorted(load_file(str(out / "probe.safetensors")).items())
              if k.endswith("weight")]
    assert shapes == [(24, meta["probe"]["dim"]), (12, 24), (meta["probe"]["outputs"], 12)]
    assert 1 <= meta["probe"]["best_epoch"] <= 50
    predictor = load_predictor(out)
    probs = predictor.predict_pixels(_pixels(predictor, load_collection(spec).image_paths[:3]))
    assert probs.shape == (3, meta["probe"]["outputs"]) and np.isfinite(probs).all()
    with pytest.raises(ConfigError, match="already holds"):
        train_probe(spec, tiny, out)


def test_masked_head_loss_ignores_missing_entries():
    from medsig.train.classify import Head
    from medsig.train.probe import _head_losses

    heads = [Head("edema", "binary", ["no", "yes"], 0, 1)]
    logits = torch.tensor([[2.0], [-1.0], [5.0]])
    full = _head_losses(logits, heads, [torch.tensor([[1.0], [0.0], [-1.0]])], None)
    kept = _head_losses(logits[:2], heads, [torch.tensor([[1.0], [0.0]])], None)
    assert torch.allclose(full, kept)  # the -1 row contributes nothing, mean over valid only


def test_zero_shot_predictor_from_a_spec(setup):
    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor

    root, spec, tiny = setup
    with pytest.raises(ConfigError, match="spec"):
        load_predictor(tiny)
    predictor = load_predictor(tiny, spec=spec, labels=["urgency", "exudate"])
    assert [h.name for h in predictor.heads] == ["urgency", "exudate"]
    probs = predictor.predict_pixels(_pixels(predictor, load_collection(spec).image_paths[:4]))
    assert probs.shape == (4, 1 + 4)
    assert np.allclose(probs[:, 1:].sum(1), 1, atol=1e-5)
    decisions = predictor.decide(probs[0])
    assert decisions[0]["decision"] in ("home care", "needs attention")


def test_probe_predicts_from_embeddings_like_from_pixels(setup):
    from medsig.data.collection import load_collection
    from medsig.models.predictor import load_predictor
    from medsig.train.probe import train_probe

    root, spec, tiny = setup
    folder = root / "logistic"
    if not (folder / "medsig.json").exists():  # run alone (-k): train it here
        train_probe(spec, tiny, folder)
    predictor = load_predictor(folder)
    assert predictor.uses_embeddings
    pixels = _pixels(predictor, load_collection(spec).image_paths[:5])
    direct = predictor.predict_pixels(pixels)
    via = predictor.predict_embeddings(predictor.embed(pixels))
    assert np.allclose(direct, via, atol=1e-5)
