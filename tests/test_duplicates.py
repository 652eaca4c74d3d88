"""Model-free near-duplicate signatures on the real chest X-rays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from medsig.data.duplicates import (
    DEFAULT_THRESHOLD,
    cached_signatures,
    image_signature,
    image_signatures,
)
from medsig.data.images import load_image


def _resaved(image: Image.Image, scale: float, quality: int, light: float) -> Image.Image:
    small = image.convert("RGB").resize((int(image.width * scale), int(image.height * scale)))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return ImageEnhance.Brightness(Image.open(buf)).enhance(light)


def test_resaved_copies_match_and_other_patients_do_not(shared_data: Path) -> None:
    root = shared_data / "covid-cxr"
    meta = pd.read_csv(root / "metadata.csv")
    images = [load_image(root / "images" / f) for f in meta["filename"]]
    sig = np.stack([image_signature(im).numpy() for im in images])
    copies = np.stack([image_signature(_resaved(im, 0.5, 50, 1.15)).numpy() for im in images])
    assert ((sig * copies).sum(1) >= DEFAULT_THRESHOLD).all()
    sim = sig @ sig.T
    patient = meta["patientid"].astype(str).to_numpy()
    other_patient = patient[:, None] != patient[None, :]
    assert sim[other_patient].max() < DEFAULT_THRESHOLD


def test_unreadable_images_are_skipped_and_the_cache_is_reused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.append(tmp_path / "bad.png")
    rows, sig, skipped = image_signatures(paths, num_workers=0)
    assert rows.tolist() == [0, 1, 2] and sig.shape == (3, 256)
    assert np.allclose(np.linalg.norm(sig, axis=1), 1, atol=1e-5)
    assert sum(skipped.values()) == 1
    cache = tmp_path / "cache" / "sig.npz"
    first = cached_signatures(paths, cache, num_workers=0)
    again = cached_signatures(paths, cache, num_workers=0)
    assert np.array_equal(first[1], again[1]) and again[2] == first[2]
    Image.new("RGB", (40, 40), (10, 20, 30)).save(paths[0])  # changed file: recomputed
    changed = cached_signatures(paths, cache, num_workers=0)
    assert not np.array_equal(changed[1][0], first[1][0])
