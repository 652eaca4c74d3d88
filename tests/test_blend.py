"""Weight-space blending (models/blend.py) and alpha selection (evaluate/retention.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medsig.errors import ConfigError, SpecError
from medsig.evaluate.retention import alpha_table, pick_alpha, ratio_text
from medsig.models.blend import blend, blend_state, parse_alphas, scale_adapter
from medsig.spec import DatasetSpec
from tests.test_train_helpers import tiny_fixture, wound_fixture  # noqa: F401 (fixtures)


def test_blend_state_interpolates_shared_tensors_and_keeps_heads():
    base = {"vision_model.w": torch.zeros(2, 2), "text_model.w": torch.ones(3)}
    tuned = {"vision_model.w": torch.full((2, 2), 4.0), "classifier.weight": torch.ones(2),
             "vision_model.steps": torch.tensor([3])}
    out, shared = blend_state(base, tuned, 0.25)
    assert shared == 1
    assert torch.equal(out["vision_model.w"], torch.full((2, 2), 1.0))
    assert torch.equal(out["classifier.weight"], torch.ones(2))  # only the fine-tune has it
    assert torch.equal(out["vision_model.steps"], torch.tensor([3]))  # integers not mixed
    assert "text_model.w" not in out


def test_blend_mixes_classifier_heads_only_when_both_have_the_same_labels(tmp_path):
    from safetensors.torch import save_file

    def folder(name, value, heads):
        d = tmp_path / name
        d.mkdir()
        save_file({"vision_model.w": torch.full((2,), value),
                   "classifier.weight": torch.full((1, 2), value)}, str(d / "model.safetensors"))
        (d / "medsig.json").write_text(json.dumps({"objective": "classify", "heads": heads}))
        return d

    def head(name):
        return [{"name": name, "kind": "binary", "classes": [f"no {name}", name],
                 "offset": 0, "size": 1}]

    broad = folder("broad", 0.0, head("urgent"))
    narrow = folder("narrow", 4.0, head("infection"))  # same shape, other label
    again = folder("again", 4.0, head("urgent"))  # continued training on the same label
    for tuned, expected in ((narrow, 4.0), (again, 2.0)):
        mixed = load_file(str(blend(broad, tuned, [0.5], tmp_path / f"out-{tuned.name}")[0]
                              / "model.safetensors"))
        assert torch.equal(mixed["vision_model.w"], torch.full((2,), 2.0))
        assert torch.equal(mixed["classifier.weight"], torch.full((1, 2), expected))


def test_lora_blend_scales_only_the_b_matrices():
    adapter = {"x.lora_A.weight": torch.ones(2, 4), "x.lora_B.weight": torch.full((4, 2), 2.0),
               "classifier.weight": torch.ones(3)}
    out = scale_adapter(adapter, 0.5)
    assert torch.equal(out["x.lora_A.weight"], adapter["x.lora_A.weight"])
    assert torch.equal(out["x.lora_B.weight"], torch.ones(4, 2))
    delta = out["x.lora_B.weight"] @ out["x.lora_A.weight"]
    assert torch.allclose(delta, 0.5 * adapter["x.lora_B.weight"] @ adapter["x.lora_A.weight"])


def test_parse_alphas_checks_the_range():
    assert parse_alphas(["0.5,0.25", "1"]) == [0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match="outside"):
        parse_alphas(["1.5"])
    with pytest.raises(ConfigError, match="not a number"):
        parse_alphas(["half"])


def test_blend_folders_load_and_hit_both_ends(tmp_path):
    from medsig.models.encoder import Encoder
    from medsig.models.tiny import write_tiny

    kw = dict(arch="siglip", image_size=32, patch_size=8, hidden_size=32, layers=1, heads=2)
    base = write_tiny(tmp_path / "base", seed=0, **kw)
    tuned = write_tiny(tmp_path / "tuned", seed=1, **kw)
    (tuned / "medsig.json").write_text(json.dumps({"objective": "contrastive"}))
    folders = blend(base, tuned, [0.0, 0.5, 1.0], tmp_path / "out")
    b, t = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    ends = [load_file(str(f / "model.safetensors")) for f in folders]
    key = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(ends[0][key], b[key]) and torch.equal(ends[2][key], t[key])
    assert torch.allclose(ends[1][key], (b[key] + t[key]) / 2)
    info = json.loads((folders[1] / "medsig.json").read_text())
    assert info["blend"]["alpha"] == 0.5 and info["objective"] == "contrastive"
    enc = Encoder.load(folders[1], device="cpu")
    assert enc.embed_texts(["a rash"]).shape == (1, 32)
    (tuned / "medsig.json").write_text(json.dumps({"objective": "probe"}))
    with pytest.raises(ConfigError, match="probe"):
        blend(base, tuned, [0.5], tmp_path / "out2")


def test_alpha_table_and_pick():
    def ci(x):
        return {"point": x, "low": x - 0.05, "high": x + 0.05}

    names = {f"a{a}": a for a in (0.0, 0.5, 0.8, 1.0)}
    in_domain = {"a0.0": ci(0.5), "a0.5": ci(0.8), "a0.8": ci(0.88), "a1.0": ci(0.9)}
    retention = {"a0.0": ci(0.4), "a0.5": ci(0.39), "a0.8": ci(0.37), "a1.0": ci(0.2)}
    rows = alpha_table(in_domain, retention, names)
    by = {r["alpha"]: r for r in rows}
    assert by[0.8]["gain_kept"] == pytest.approx(0.95)
    assert by[0.8]["retained"] == pytest.approx(0.925)
    assert by[0.5]["drop_recovered"] == pytest.approx(0.95)
    assert pick_alpha(rows) == {"alpha": 0.8, "model": "a0.8", "meets": True}
    retention["a0.8"] = ci(0.3)
    pick = pick_alpha(alpha_table(in_domain, retention, names))
    assert pick["meets"] is False and pick["alpha"] == 0.5  # best compromise, flagged


def test_alpha_table_intervals_over_paired_resamples():
    import numpy as np

    def ci(x, reps):
        return {"point": x, "replicates": reps}

    names = {"a0": 0.0, "a5": 0.5, "a1": 1.0}
    # three resamples, the same for every model; one undefined (None) at alpha 0.5
    in_domain = {"a0": ci(0.5, [0.5, 0.4, 0.6]), "a5": ci(0.8, [0.8, None, 0.75]),
                 "a1": ci(0.9, [0.9, 0.8, 0.8])}
    retention = {"a0": ci(0.4, [0.4, 0.5, 0.4]), "a5": ci(0.38, [0.38, 0.45, 0.3]),
                 "a1": ci(0.2, [0.2, 0.25, 0.3])}
    row = alpha_table(in_domain, retention, names)[1]
    assert "replicates" not in row["in_domain"] and "replicates" not in row["retention"]
    # gain kept per resample: 0.75, (skipped), 0.75 ; drop recovered: 0.9, 0.8, 0.0
    assert row["gain_kept_ci"]["low"] == pytest.approx(0.75)
    assert row["gain_kept_ci"]["n_boot"] == 2
    expected = np.percentile([0.9, 0.8, 0.0], [2.5, 97.5])
    assert [row["drop_recovered_ci"]["low"], row["drop_recovered_ci"]["high"]] == \
        pytest.approx(expected.tolist())
    assert row["retained_ci"]["high"] == pytest.approx(np.percentile([0.95, 0.9, 0.75], 97.5))
    plain = alpha_table({k: {"point": v["point"]} for k, v in in_domain.items()},
                        retention, names)[1]
    assert plain["gain_kept_ci"] is None  # no resamples kept: no interval claimed
    assert ratio_text(row["gain_kept"], row["gain_kept_ci"]) == "75% [75, 75]"
    assert ratio_text(-0.004, None) == "0%" and ratio_text(float("nan"), None) == "-"


def test_ci_keeps_resamples_in_step_with_undefined_ones():
    import numpy as np

    from medsig.evaluate.statistics import _ci

    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])

    def mean_or_fail(v):
        if v.sum() == 0:
            raise ValueError("undefined")
        return float(v.mean())

    res = _ci(mean_or_fail, (y,), None, 40, 0, keep=True)
    assert len(res["replicates"]) == 40
    assert sum(np.isnan(res["replicates"])) == res["n_skipped"]
    assert "replicates" not in _ci(mean_or_fail, (y,), None, 40, 0)


def test_spec_retention_block_is_validated(tmp_path):
    base = {"table": "t.csv", "columns": {"image": "f"}}
    spec = DatasetSpec.from_dict({**base, "retention": {"metric": "clustering/nmi:category",
                                                        "spec": "../broad/spec.yaml"}})
    assert spec.retention == {"metric": "clustering/nmi:category", "spec": "../broad/spec.yaml"}
    assert spec.to_dict()["retention"]["metric"] == "clustering/nmi:category"
    with pytest.raises(SpecError, match="retention.metric"):
        DatasetSpec.from_dict({**base, "retention": {"spec": "x.yaml"}})
    with pytest.raises(SpecError, match="retention.wrong"):
        DatasetSpec.from_dict({**base, "retention": {"metric": "m", "wrong": 1}})


def test_train_config_blend_option():
    from medsig.train.config import load_config

    base = {"spec": "s.yaml", "model": "m", "out": "o"}
    assert load_config({**base, "blend": [0.5, 0.8]}).blend == [0.5, 0.8]
    with pytest.raises(ConfigError, match="blend"):
        load_config({**base, "objective": "probe", "blend": [0.5]})
    with pytest.raises(ConfigError, match="blend"):
        load_config({**base, "blend": [2]})


def test_training_records_pad_for_serving_and_writes_blends(tmp_path, wound, tiny):  # noqa: F811
    from medsig.models.families import read_record
    from medsig.models.predictor import load_predictor
    from medsig.train import train
    from tests.test_train_helpers import config

    out = train(config(wound, tiny, tmp_path / "clf", objective="classify", preprocess="pad",
                       blend=[0.5]))
    assert read_record(out)["mode"] == "pad"
    predictor = load_predictor(str(out), device="cpu")
    assert predictor.preprocess.mode == "pad"  # what serve and eval apply
    blended = out / "blend" / "alpha-0.50"
    assert json.loads((blended / "medsig.json").read_text())["blend"]["alpha"] == 0.5
    assert load_predictor(str(blended), device="cpu").preprocess.mode == "pad"
    again = train(config(wound, out, tmp_path / "clf2", objective="classify"))
    assert read_record(again)["mode"] == "pad"  # a second fine-tune keeps the recorded mode
    assert json.loads((again / "medsig.json").read_text())["preprocessing"]["mode"] == "pad"
