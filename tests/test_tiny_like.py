"""`medsig model tiny --like HUB_ID`: random checkpoints with a public model's architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medsig.errors import ConfigError
from medsig.models.tiny import LIKE, write_like, write_tiny


@pytest.mark.parametrize("hub_id, image, patch, positions, layers_real, resample", [
    ("google/medsiglip-448", 448, 14, 64, 27, 3),
    ("openai/clip-vit-base-patch32", 224, 32, 77, 12, 3),
])
def test_like_has_the_real_architecture(tmp_path: Path, hub_id: str, image: int, patch: int,
                                        positions: int, layers_real: int,
                                        resample: int) -> None:
    from transformers import AutoConfig, AutoModel, AutoProcessor

    folder = write_like(tmp_path / "m", hub_id, layers=1, hidden_size=32)
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == LIKE[hub_id].arch
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, t.max_position_embeddings) == (image, patch, positions)
    assert v.num_hidden_layers == t.num_hidden_layers == 1
    names = {n for n, _ in AutoModel.from_pretrained(folder).named_modules()}
    assert any(n.endswith("self_attn.q_proj") for n in names)  # LoRA target names exist
    proc = AutoProcessor.from_pretrained(folder)
    out = proc(images=[Image.new("RGB", (500, 300))], text=["a chest x-ray"],
               padding="max_length", return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (image, image)
    assert out["input_ids"].shape[1] == positions
    assert proc.image_processor.resample == resample
    info = json.loads((folder / "medsig_tiny.json").read_text())
    assert info["like"] == hub_id and info["real_layers"]["vision"] == layers_real
    assert info["random_init"] is True


def test_like_full_width_config_and_errors(tmp_path: Path) -> None:
    """Without --hidden the widths are the real ones (checked on the config only)."""
    so = LIKE["google/siglip-so400m-patch14-384"]
    assert (so.image_size, so.patch_size, so.vision) == (384, 14, (1152, 4304, 27, 16))
    assert LIKE["google/siglip2-base-patch16-224"].vocab_size == 256000
    with pytest.raises(ConfigError, match="no architecture recorded for 'x/y'"):
        write_like(tmp_path / "x", "x/y")
    with pytest.raises(ConfigError, match="--layers must be >= 1"):
        write_like(tmp_path / "x", "google/medsiglip-448", layers=0)


def test_tiny_runs_in_the_transformers_zero_shot_pipeline(tmp_path: Path) -> None:
    """Tiny checkpoints have 64 text positions: HF's pipeline pads to 64 and runs."""
    from transformers import pipeline

    folder = write_tiny(tmp_path / "t", image_size=32)
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    result = pipe(Image.new("RGB", (40, 40), (200, 80, 80)), candidate_labels=["a", "b"])
    assert {r["label"] for r in result} == {"a", "b"}
