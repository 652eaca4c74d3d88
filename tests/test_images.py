"""The one image loader: modes, EXIF, DICOM, every bad-image kind; transforms."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsig.data.images import load_image, sniff_format
from medsig.data.transforms import Augment, Preprocess, pad_to_square
from medsig.errors import ImageError


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    base = Image.linear_gradient("L").resize((40, 30))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base, dtype=np.uint16) * 200)
    elif mode in ("I", "F"):
        image = base.convert(mode)
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    out = load_image(_png(image, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    arr = np.asarray(out)
    if mode not in ("1", "P"):  # a gradient stays a gradient: top row darker than bottom
        assert arr[0].mean() < arr[-1].mean()


def test_sixteen_bit_uses_full_range():
    values = np.linspace(1000, 1200, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = np.asarray(load_image(_png(Image.fromarray(values))))
    assert out.min() == 0 and out.max() == 255  # a narrow 16-bit range is stretched, not black


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 60)


def test_alpha_is_composited_not_dropped_to_garbage():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(load_image(_png(image))).max() == 0


def test_jpeg_draft_decodes_at_reduced_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1536, 3),
                                                              dtype=np.uint8))
    data = _png(image, "JPEG")
    small = load_image(data, draft_size=128)
    assert min(small.size) >= 128 and small.size[0] <= 1536 // 4
    assert load_image(data).size == (1536, 1024)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_an_image",
                                  "too_large", "directory"])
def test_bad_images_raise_a_reason(tmp_path: Path, kind):
    path = tmp_path / "img.png"
    good = _png(Image.new("RGB", (300, 300), (1, 2, 3)), "JPEG")
    max_pixels = None
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not_an_image":
        path.write_text("patient,finding\n1,covid\n")
    elif kind == "too_large":
        path.write_bytes(good)
        max_pixels = 10_000
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=max_pixels) if max_pixels else load_image(path)
    expected = {"directory": "not_a_file"}.get(kind, kind)
    assert info.value.reason == expected
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_decompression_bomb_header_is_rejected_before_decoding():
    # a PNG header claiming 100,000 x 100,000 pixels (10 G pixels) with almost no data
    image = Image.new("L", (1, 1))
    data = bytearray(_png(image))
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the header valid
    with pytest.raises(ImageError) as info:
        load_image(bytes(data))
    assert info.value.reason == "too_large"


def test_sniff_format_reads_bytes_not_names():
    assert sniff_format(_png(Image.new("RGB", (4, 4)))) == "png"
    assert sniff_format(_png(Image.new("RGB", (4, 4)), "JPEG")) == "jpeg"
    assert sniff_format(_png(Image.new("RGB", (4, 4)), "WEBP")) == "webp"
    assert sniff_format(b"GIF89a....") == "gif"
    assert sniff_format(b"%PDF-1.7") is None


def _dicom(name: str) -> Path:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return Path(path)


def test_dicom_ct_with_rescale():
    import pydicom

    path = _dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (ds.Columns, ds.Rows)
    assert sniff_format(path.read_bytes()) == "dicom"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    arr = np.asarray(out)[..., 0].astype(float)
    # monotone mapping of Hounsfield units to gray levels, full range
    assert arr.min() == 0 and arr.max() == 255
    assert np.corrcoef(arr.ravel(), hu.ravel())[0, 1] > 0.99


def test_dicom_window_and_monochrome1(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    raw = ds.pixel_array.astype(float)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.asarray(load_image(_dicom("MR_small.dcm")))[..., 0]
    inside = (raw > center - width / 2 + 1) & (raw < center + width / 2 - 1)
    assert windowed[raw <= center - width / 2 - 1].max(initial=0) == 0
    assert windowed[raw >= center + width / 2 + 1].min(initial=255) == 255
    assert 0 < windowed[inside].mean() < 255
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "inverted.dcm"
    ds.save_as(inverted_path)
    inverted = np.asarray(load_image(inverted_path))[..., 0].astype(int)
    assert np.abs(inverted + windowed.astype(int) - 255).max() <= 1


def test_dicom_truncated_is_a_skip_reason():
    with pytest.raises(ImageError) as info:
        load_image(_dicom("MR_truncated.dcm"))
    assert info.value.reason in ("truncated", "unreadable")


def test_dicom_without_pixels_is_not_an_image():
    with pytest.raises(ImageError) as info:
        load_image(_dicom("rtplan.dcm"))
    assert info.value.reason == "not_an_image"


# -- transforms ------------------------------------------------------------------------------
def test_pad_to_square_centres_the_image():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    square = np.asarray(pad_to_square(image))
    assert square.shape == (40, 40, 3)
    assert square[:10].max() == 0 and square[30:].max() == 0 and square[10:30].min() == 255


def test_preprocess_pad_keeps_aspect_resize_stretches():
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    padded = Preprocess(16, mode="pad")(image)
    stretched = Preprocess(16, mode="resize")(image)
    assert padded.shape == stretched.shape == (3, 16, 16)
    assert torch.allclose(stretched, torch.ones_like(stretched))  # white → +1 after (x-.5)/.5
    assert padded[:, 0].max() == -1 and padded[:, 8].min() == 1  # black pad rows, white middle


def test_preprocess_matches_the_hf_processor_on_square_images(tmp_path):
    from transformers import AutoImageProcessor

    from medsig.models.tiny import write_tiny

    folder = write_tiny(tmp_path / "tiny", arch="siglip", image_size=32)
    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3),
                                                              dtype=np.uint8))
    ours = Preprocess.from_processor(processor, mode="pad")(image)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().max() < 0.02  # same resample, same normalisation
    via = Preprocess.from_processor(processor, mode="processor")(image)
    assert torch.allclose(via, theirs)


def test_augment_is_deterministic_per_generator_and_varies():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 120, 3),
                                                              dtype=np.uint8))
    aug = Augment(48)
    a = aug(image, generator=torch.Generator().manual_seed(5))
    b = aug(image, generator=torch.Generator().manual_seed(5))
    c = aug(image, generator=torch.Generator().manual_seed(6))
    assert a.size == (48, 48)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
