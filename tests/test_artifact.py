"""The model-folder record: round trips, extension sections, older files, portable paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsig.errors import ConfigError
from medsig.models.artifact import (
    Artifact,
    Preprocessing,
    adapter_base,
    hub_id,
    reference,
    resolve,
    write_adapter_base,
)
from medsig.models.heads import Head


def _artifact() -> Artifact:
    heads = [Head("urgency", "binary", ["home care", "needs attention"], 0, 1, [0.4], "youden"),
             Head("risk", "multiclass", ["Low", "High"], 1, 2, [], "argmax")]
    return Artifact("classify", base_model="google/siglip-base-patch16-224",
                    preprocessing=Preprocessing("pad", 64, [0.5] * 3, [0.5] * 3, 3),
                    heads=heads, labels=["urgency", "risk"])


def test_round_trip_keeps_every_section_and_unknown_keys(tmp_path: Path) -> None:
    art = _artifact()
    art.calibration = {"urgency": {"temperature": 1.3}}
    art.ood = {"mean": [0.0, 1.0]}
    art.extras = {"future_section": {"x": 1}}
    art.metrics = {"val": {"val/auc": float("nan")}}
    art.save(tmp_path)
    raw = json.loads((tmp_path / "medsig.json").read_text())
    assert raw["schema"] == 2 and raw["kind"] == "classify" and "conformal" not in raw
    assert raw["metrics"]["val"]["val/auc"] is None  # strict JSON
    back = Artifact.load(tmp_path)
    assert back.heads == art.heads and back.preprocessing == art.preprocessing
    assert back.calibration == art.calibration and back.ood == art.ood
    assert back.conformal is None and back.extras == {"future_section": {"x": 1}}
    assert back.base_hub_id == "google/siglip-base-patch16-224"
    assert back.preprocessing.build().size == 64


def test_schema_1_files_load_and_newer_ones_are_refused(tmp_path: Path) -> None:
    old = {"medsig_version": "0.1.0", "objective": "contrastive", "base_model": "tiny",
           "encoder": ".", "preprocess": "pad", "image_size": 32,
           "config": {"adapt": {"method": "lora", "lora": {"merge": False}}},
           "heads": [{"name": "e", "kind": "binary", "classes": ["no", "yes"], "offset": 0,
                      "size": 1, "thresholds": None}]}
    (tmp_path / "medsig.json").write_text(json.dumps(old))
    art = Artifact.load(tmp_path)
    assert (art.schema, art.kind, art.preprocessing.size) == (1, "lora-adapter", 32)
    assert art.heads[0].thresholds == [0.5]
    (tmp_path / "medsig.json").write_text(json.dumps({**old, "schema": 99}))
    with pytest.raises(ConfigError, match="newer"):
        Artifact.load(tmp_path)
    (tmp_path / "medsig.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        Artifact.load(tmp_path)
    with pytest.raises(ConfigError, match="no medsig.json"):
        Artifact.load(tmp_path / "nowhere")


def test_paths_are_stored_relative_and_hub_ids_kept(tmp_path: Path) -> None:
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    out = tmp_path / "runs" / "probe"
    out.mkdir(parents=True)
    assert reference(base, out) == "../../models/tiny"
    assert reference(out, out) == "."
    assert reference("google/siglip-base-patch16-224", out) == "google/siglip-base-patch16-224"
    assert Path(resolve("../../models/tiny", out)) == base.resolve()
    assert hub_id("../../models/tiny", out) is None  # a local base without a medsig.json
    (base / "medsig.json").write_text(json.dumps({"objective": "contrastive",
                                                  "base_model": "org/model"}))
    assert hub_id("../../models/tiny", out) == "org/model"  # followed through the folder


def test_adapter_base_prefers_the_config_then_the_relative_record(tmp_path: Path) -> None:
    base = tmp_path / "tiny"
    base.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path":
                                                             "tiny"}))
    write_adapter_base(adapter, str(base))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert adapter_base(adapter) == str(base.resolve())
    Artifact("contrastive", base_model="../tiny", adaptation="lora-adapter").save(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path":
                                                             "/gone/tiny"}))
    assert Path(adapter_base(adapter)) == base.resolve()
    base.rmdir()
    with pytest.raises(ConfigError, match="not found"):
        adapter_base(adapter)


def test_saving_a_siglip_model_logs_no_default_config_warning(tmp_path):
    """transformers diffs a config against its class default on save; SigLIP's default has
    CLIP's token ids outside its vocabulary: medsig's save must not print that warning."""
    import logging

    from transformers import SiglipConfig, SiglipModel

    from medsig.models.artifact import save_model

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.configuration_utils")
    handler = Keep()
    logger.addHandler(handler)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2)
    config = SiglipConfig(text_config=dict(tiny, vocab_size=100, bos_token_id=1,
                                           eos_token_id=2, pad_token_id=0),
                          vision_config=dict(tiny, image_size=16, patch_size=8))
    model = SiglipModel(config)
    try:
        logging.Logger.warning_once.cache_clear()
        save_model(model, tmp_path / "medsig")
        assert not [r for r in records if "within the vocabulary" in r]
        logging.Logger.warning_once.cache_clear()
        model.save_pretrained(tmp_path / "plain")  # the plain call does log it (the test can fail)
        assert [r for r in records if "within the vocabulary" in r]
    finally:
        logger.removeHandler(handler)
        logging.Logger.warning_once.cache_clear()
