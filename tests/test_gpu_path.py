"""The accelerator path, checked on CPU: uint8 workers + on-device normalisation give
today's pixels, bf16 matches fp32, texts tokenised in workers, precision flags, SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsig.data.collection import load_collection
from medsig.data.reader import read_batches
from medsig.data.transforms import Preprocess, pad_to_square
from medsig.errors import ConfigError
from medsig.models.device import check_precision, default_batch_size, precision_dtype
from medsig.models.embedding import embed_arrays, iter_embeddings
from medsig.models.encoder import Encoder
from medsig.models.tiny import write_tiny
from tests.conftest import write_wound_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("m") / "siglip", arch="siglip", image_size=32)


def _reference(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The preprocessing as it was before the uint8 split (float32 on the CPU)."""
    if pre.mode == "pad":
        image = pad_to_square(image)
    if image.size != (pre.size, pre.size):
        image = image.resize((pre.size, pre.size), pre.resample)
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return (tensor - pre.mean) / pre.std


@pytest.mark.parametrize("mode", ["pad", "resize"])
def test_uint8_then_normalise_equals_todays_preprocessing(mode):
    rng = np.random.default_rng(0)
    pre = Preprocess(48, mean=(0.48, 0.45, 0.40), std=(0.27, 0.26, 0.28), mode=mode)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((48, 48), (60, 90), (200, 120), (31, 17))]
    batch = torch.stack([pre.to_uint8(im) for im in images])
    assert batch.dtype == torch.uint8
    got = pre.normalize(batch)
    want = torch.stack([_reference(im, pre) for im in images])
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(pre(images[1]), want[1], atol=1e-5, rtol=0)


@pytest.fixture
def spec(tmp_path):
    spec = write_wound_spec(tmp_path)
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        arr = rng.integers(0, 255, size=(40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"a{i}.png")
    return spec


def test_engine_matches_the_float_path_and_tokenises_in_workers(spec, tiny):
    enc = Encoder.load(tiny)
    col = load_collection(spec)
    # a worker process decodes and tokenises (on CPU it also normalises)
    image, text, rows, _ = embed_arrays(enc, col, batch_size=2, num_workers=1)
    assert list(rows) == list(range(5)) and text is not None
    timings: dict[str, float] = {}
    assert len(list(iter_embeddings(enc, col, [0, 1, 2], 2, 0, timings))) == 2
    assert {"read_wait", "model", "device_wait", "first_batch"} <= set(timings)
    floats = torch.cat([b.pixels for b in read_batches(col.image_paths, list(range(5)),
                                                       enc.preprocess, 5, 0)])
    assert floats.dtype == torch.float32
    assert np.allclose(image, enc.embed_images(floats).numpy(), atol=1e-5)
    want = enc.embed_texts([col.text(r) for r in range(5)]).numpy()
    assert np.allclose(text, want, atol=1e-5)
    batches = list(read_batches(col.image_paths, [0, 1], enc.preprocess, 2, 0, uint8=True,
                                texts=["x", "y"], tokenize=enc.tokenize_fn()))
    assert batches[0].pixels.dtype == torch.uint8 and batches[0].texts == ["x", "y"]
    # what an accelerator gets: uint8 normalised by the encoder, the same embeddings
    assert torch.allclose(enc.embed_images(batches[0].pixels), enc.embed_images(floats[:2]),
                          atol=1e-5)
    assert batches[0].tokens["input_ids"].shape == (2, enc.max_text_len)


def _cpu_bf16() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool(torch.isfinite(x @ x).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_bf16(), reason="this CPU build has no bf16 matmul")
def test_bf16_matches_fp32_and_sdpa_is_used(tiny):
    """Tiny model: cosine >= 0.999 (measured 1.0000); real shapes: bench/gpu.py prints it."""
    fp32, bf16 = Encoder.load(tiny, precision="fp32"), Encoder.load(tiny, precision="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert fp32.model.config._attn_implementation == "sdpa"
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cos = (fp32.embed_images(pixels) * bf16.embed_images(pixels)).sum(-1)
    assert float(cos.min()) >= 0.999, cos
    texts = ["a wound with erythema", "chest x-ray, left lower lobe opacity"]
    cos_t = (fp32.embed_texts(texts) * bf16.embed_texts(texts)).sum(-1)
    assert float(cos_t.min()) >= 0.999, cos_t


def test_precision_choices():
    cpu = torch.device("cpu")
    assert precision_dtype("auto", cpu) == torch.float32
    assert precision_dtype("BF16", cpu) == torch.bfloat16
    assert precision_dtype("fp16", cpu) == torch.float16
    assert default_batch_size(cpu) == 64 and default_batch_size(torch.device("cuda")) == 256
    with pytest.raises(ConfigError, match="unknown precision 'fp64'"):
        check_precision("fp64")
