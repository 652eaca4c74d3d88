"""Offline tiny checkpoints load with plain transformers; the Encoder embeds through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsig.errors import ConfigError
from medsig.models.device import inference_dtype, select_device
from medsig.models.encoder import Encoder
from medsig.models.tiny import write_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny(root / arch, arch=arch, image_size=32, seed=0)
            for arch in ("siglip", "clip", "vit")}


@pytest.mark.parametrize("arch", ["siglip", "clip"])
def test_plain_transformers_loads_model_processor_tokenizer(folders, arch):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    model = AutoModel.from_pretrained(folders[arch])
    processor = AutoProcessor.from_pretrained(folders[arch])
    tokenizer = AutoTokenizer.from_pretrained(folders[arch])
    ids = tokenizer(["erythema around the incision"])["input_ids"][0]
    assert tokenizer.unk_token_id not in ids  # byte-level BPE: no unknown tokens
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == \
        "erythema around the incision"
    inputs = processor(text=["a wound"], images=[np.zeros((40, 50, 3), np.uint8)],
                       return_tensors="pt", padding="max_length", max_length=16)
    out = model(**inputs)
    assert out.logits_per_image.shape == (1, 1)


def test_encoder_embeds_like_the_model(folders):
    enc = Encoder.load(folders["siglip"])
    assert enc.kind == "siglip" and enc.embed_dim == 64 and enc.image_size == 32
    assert enc.logit_bias is not None
    assert float(enc.logit_scale.detach().exp()) == pytest.approx(10.0)
    pixels = torch.randn(3, 3, 32, 32)
    emb = enc.embed_images(pixels)
    want = enc.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(emb, F.normalize(want, dim=-1), atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = enc.tokenize(["a", "a much longer description of a wound"])
    assert tokens["input_ids"].shape[1] == enc.max_text_len  # SigLIP pads to max length
    texts = enc.embed_texts(["a", "b", "c"], batch_size=2)
    assert texts.shape == (3, 64) and torch.allclose(texts.norm(dim=-1), torch.ones(3))
    # the same text embeds the same, whatever its batch
    assert torch.allclose(texts[2], enc.embed_texts(["c"])[0], atol=1e-5)


def test_clip_and_image_only_kinds(folders):
    clip = Encoder.load(folders["clip"])
    assert clip.kind == "clip" and clip.logit_bias is None
    tokens = clip.tokenize(["a", "a longer text here"])
    assert tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum()
    vit = Encoder.load(folders["vit"])
    assert vit.kind == "image" and vit.tokenizer is None
    assert vit.embed_images(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ConfigError, match="image-only"):
        vit.embed_texts(["x"])


def test_classifier_checkpoint_embeds_as_image_encoder(folders, tmp_path):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folders["siglip"], num_labels=3)
    model.save_pretrained(tmp_path / "cls")
    Encoder.load(folders["siglip"]).image_processor.save_pretrained(tmp_path / "cls")
    enc = Encoder.load(tmp_path / "cls")
    assert enc.kind == "image" and enc.tokenizer is None
    pixels = torch.randn(2, 3, 32, 32)
    hidden = model.vision_model(pixel_values=pixels).last_hidden_state.mean(dim=1)
    assert torch.allclose(enc.embed_images(pixels), F.normalize(hidden, dim=-1), atol=1e-5)


def test_save_round_trip_and_errors(folders, tmp_path):
    enc = Encoder.load(folders["siglip"])
    enc.save(tmp_path / "copy")
    again = Encoder.load(tmp_path / "copy")
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(enc.embed_images(pixels), again.embed_images(pixels))
    with pytest.raises(ConfigError, match="cannot load model"):
        Encoder.load(tmp_path / "nothing-here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        Encoder.load(tmp_path / "broken")


def test_tiny_is_deterministic_per_seed(tmp_path):
    a = Encoder.load(write_tiny(tmp_path / "a", image_size=16, seed=3))
    b = Encoder.load(write_tiny(tmp_path / "b", image_size=16, seed=3))
    c = Encoder.load(write_tiny(tmp_path / "c", image_size=16, seed=4))
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(a.embed_images(x), b.embed_images(x))
    assert not torch.equal(a.embed_images(x), c.embed_images(x))


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    assert inference_dtype(torch.device("cpu")) == torch.float32  # no bf16 on this CPU
    with pytest.raises(ConfigError):
        select_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            select_device("cuda")


def test_cached_hub_id_loads_from_the_snapshot_without_network(folders, tmp_path,
                                                                 monkeypatch):
    import shutil
    import socket

    import huggingface_hub.constants as hf_constants

    from medsig.models.encoder import resolve_cached

    # a hub id laid out in a Hugging Face cache, as `huggingface-cli download` leaves it
    repo = tmp_path / "hub" / "models--medsig--tiny-test"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(folders["siglip"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_cached("medsig/tiny-test") == str(snapshot)
    assert resolve_cached("medsig/not-cached") == "medsig/not-cached"
    lookups: list[str] = []

    def no_network(host, *args, **kwargs):
        lookups.append(str(host))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    enc = Encoder.load("medsig/tiny-test")
    assert enc.name == "medsig/tiny-test" and enc.kind == "siglip"
    assert lookups == []  # loaded from the snapshot: not one network lookup
