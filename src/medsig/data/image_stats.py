"""Image statistics: a small, model-free description of what a picture looks like.

``image_stats`` maps one decoded RGB image (a PIL image or a ``(h, w, 3)`` uint8 array: what
``load_image`` / ``Preprocess.to_uint8`` produce, before model normalisation) to ``DIM``
floats, computed on a ``SIZE`` × ``SIZE`` box-filtered copy, deterministic, about a
millisecond per image with numpy:

- colour (HSV): the hue histogram (8 bins) weighted by saturation, saturation and value
  quantiles, and the opponent channels' (lightness, red-green, yellow-blue) mean and spread;
- layout: the mean lightness of a 3 × 3 grid relative to the whole image;
- texture: gradient energy at two scales, the Laplacian's energy, the share of strong
  edges and how much the edges share one orientation (structure-tensor coherence);
- the region unlike the image's median colour (the "finding" against the background): its
  area, colour offset, elongation, spread and distance from the centre.

It is the OOD gate's second channel (``medsig.models.ood``): a wound photo, a skin-lesion
photo, a grey X-ray, a screenshot and noise differ in these numbers whatever an encoder has
learnt. ``pixel_stats`` applies it to a batch of preprocessed pixels (the same pixels the
encoder sees, normalisation undone), so training, evaluation and serving agree.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

SIZE = 64  # working resolution of every statistic
SPECTRUM_BANDS = 6
HUE_BINS = 8
DEV_HUE_BINS = 4
GRID = 3
DEVIATION = 0.15  # RGB distance (0-1 scale, per-channel RMS) from the median colour
NAMES = (
    [f"hue_{i}" for i in range(HUE_BINS)]
    + ["sat_q10", "sat_q50", "sat_q90", "val_q05", "val_q50", "val_q95"]
    + ["l_mean", "l_std", "rg_mean", "rg_std", "yb_mean", "yb_std"]
    + [f"grid_{i}" for i in range(GRID * GRID)]
    + ["grad_fine", "grad_coarse", "laplacian", "edge_share", "coherence",
       "grad_q50", "grad_q90", "grad_q99", "light_q02", "light_q98"]
    + [f"{k}_{i}" for k in ("band_power", "band_anisotropy") for i in range(SPECTRUM_BANDS)]
    + ["dev_area", "dev_l", "dev_rg", "dev_yb", "dev_elongation", "dev_spread", "dev_offset",
       "dev_fill", "dev_parts", "dev_largest", "dev_compact", "dev_texture"]
    + [f"dev_hue_{i}" for i in range(DEV_HUE_BINS)]
)
DIM = len(NAMES)


def _rgb01(image: Any) -> np.ndarray:
    """(SIZE, SIZE, 3) float32 in [0, 1] from a PIL image or a (h, w, 3) uint8 array."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"image statistics need a (h, w, 3) uint8 array, got "
                             f"{array.dtype} {array.shape}")
        image = Image.fromarray(array)
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BOX if min(image.size) >= SIZE
                             else Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1), saturation, value (all (SIZE, SIZE))."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, low = rgb.max(axis=2), rgb.min(axis=2)
    chroma = top - low
    sat = np.where(top > 0, chroma / np.maximum(top, 1e-6), 0.0)
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(top == r, ((g - b) / safe) % 6,
                   np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6.0
    return hue % 1.0, np.where(chroma > 0, sat, 0.0), top


def _log(x: Any, floor: float = 1e-3) -> np.ndarray:
    """Energies and areas on a log scale (closer to Gaussian; zero stays finite)."""
    return np.log(np.asarray(x, dtype=np.float64) + floor)


def _colour(rgb: np.ndarray, hue: np.ndarray, sat: np.ndarray, value: np.ndarray
            ) -> np.ndarray:
    hist = np.bincount(np.minimum((hue * HUE_BINS).astype(int), HUE_BINS - 1).ravel(),
                       weights=sat.ravel(), minlength=HUE_BINS)
    hist = np.sqrt(hist / sat.size)  # Hellinger-style: closer to Gaussian
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    light = rgb.mean(axis=2)
    rg, yb = r - g, (r + g) / 2 - b
    return np.concatenate([
        hist, np.quantile(sat, [0.1, 0.5, 0.9]), np.quantile(value, [0.05, 0.5, 0.95]),
        [light.mean(), _log(light.std()), rg.mean(), _log(rg.std()), yb.mean(),
         _log(yb.std())]])


def _layout(light: np.ndarray) -> np.ndarray:
    cells = np.array_split(np.arange(SIZE), GRID)
    return np.array([light[np.ix_(a, b)].mean() for a in cells for b in cells]) - light.mean()


def _texture(light: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(light)
    mag = np.hypot(gx, gy)
    coarse = light.reshape(SIZE // 4, 4, SIZE // 4, 4).mean(axis=(1, 3))
    cy, cx = np.gradient(coarse)
    lap = (np.roll(light, 1, 0) + np.roll(light, -1, 0) + np.roll(light, 1, 1)
           + np.roll(light, -1, 1) - 4 * light)[1:-1, 1:-1]
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.hypot(jxx - jyy, 2 * jxy) / max(jxx + jyy, 1e-9)
    return np.r_[_log([np.sqrt((mag ** 2).mean()), np.sqrt((cx ** 2 + cy ** 2).mean()),
                       np.abs(lap).mean(), (mag > 0.1).mean()]), coherence,
                 _log(np.quantile(mag, [0.5, 0.9, 0.99])),
                 np.quantile(light - np.median(light), [0.02, 0.98])]


@lru_cache(maxsize=1)
def _grids() -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Constant arrays: pixel coordinates (centred, -0.5..0.5), the Hann window, the
    spectrum's radial band masks and orientation sectors."""
    coords = np.stack(np.mgrid[0:SIZE, 0:SIZE], axis=-1).reshape(-1, 2) / (SIZE - 1) - 0.5
    window = np.hanning(SIZE)[:, None] * np.hanning(SIZE)[None, :]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] - SIZE // 2
    radius, angle = np.hypot(yy, xx), (np.arctan2(yy, xx) % np.pi) / np.pi
    edges = np.geomspace(1, SIZE // 2, SPECTRUM_BANDS + 1)
    bands = [(radius >= lo) & (radius < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return coords, window, bands, np.minimum((angle * 8).astype(int), 7)


def _spectrum(light: np.ndarray) -> np.ndarray:
    """Rotation-free frequency content: log power in ``SPECTRUM_BANDS`` radial bands and,
    per band, how unevenly it spreads over 8 orientations (lines and stitches: uneven)."""
    _, window, bands, sector = _grids()
    power = np.abs(np.fft.fftshift(np.fft.fft2((light - light.mean()) * window))) ** 2
    energy, spread = [], []
    for band in bands:
        per = np.bincount(sector[band], weights=power[band], minlength=8)
        energy.append(power[band].mean())
        spread.append(per.max() / max(per.mean(), 1e-12))
    return np.r_[_log(energy, 1e-6), np.log(np.maximum(spread, 1.0))]  # 1: even (or none)


def _deviating(rgb: np.ndarray, hue: np.ndarray, sat: np.ndarray) -> np.ndarray:
    """The pixels far from the median colour: area, colour offset, shape, position, how
    much of its ellipse the region fills, how many pieces it has, and its hue histogram."""
    from scipy.ndimage import binary_erosion, label

    median = np.median(rgb.reshape(-1, 3), axis=0)
    diff = rgb - median
    far = np.sqrt((diff ** 2).mean(axis=2)) > DEVIATION
    area = far.mean()
    if far.sum() < 3:
        return np.r_[_log(area), np.zeros(11 + DEV_HUE_BINS)]
    d = diff[far]
    ys, xs = np.nonzero(far)
    coords = np.stack([ys, xs], axis=1) / (SIZE - 1) - 0.5
    centre = coords.mean(axis=0)
    cov = np.cov(coords.T) + 1e-6 * np.eye(2)
    low, high = np.linalg.eigvalsh(cov)
    grid = _grids()[0] - centre
    inside = np.einsum("ij,jk,ik->i", grid, np.linalg.inv(cov), grid) < 4.0  # 2 sigma
    fill = far.ravel()[inside].mean() if inside.any() else 0.0
    parts, n = label(far)
    sizes = np.bincount(parts.ravel())
    big = parts == int(np.argmax(sizes[1:]) + 1)
    edge = big & ~binary_erosion(big)
    compact = np.log(edge.sum() ** 2 / (4 * np.pi * big.sum()) + 1e-3)
    gy, gx = np.gradient(rgb.mean(axis=2))
    mag = np.hypot(gx, gy)
    texture = np.log((mag[far].mean() + 1e-3) / (mag[~far].mean() + 1e-3)) if (~far).any() \
        else 0.0
    hist = np.bincount(np.minimum((hue[far] * DEV_HUE_BINS).astype(int), DEV_HUE_BINS - 1),
                       weights=sat[far], minlength=DEV_HUE_BINS) / far.sum()
    return np.r_[_log(area), d.mean(), (d[:, 0] - d[:, 1]).mean(),
                 ((d[:, 0] + d[:, 1]) / 2 - d[:, 2]).mean(),
                 1.0 - np.sqrt(max(low, 0.0) / high), np.sqrt(low + high),
                 float(np.hypot(*centre)), fill, np.log(n), sizes[1:].max() / far.sum(),
                 compact, texture, np.sqrt(hist)]


def image_stats(image: Any) -> np.ndarray:
    """(DIM,) float32 statistics of one RGB image (see ``NAMES`` and the module docstring)."""
    rgb = _rgb01(image)
    hue, sat, value = _hsv(rgb)
    light = rgb.mean(axis=2)
    weber = light / max(float(np.median(light)), 0.05)  # contrast relative to the background
    return np.concatenate([_colour(rgb, hue, sat, value), _layout(light), _texture(weber),
                           _spectrum(weber), _deviating(rgb, hue, sat)]).astype(np.float32)


def pixel_stats(pixels: Any, preprocess: Any) -> np.ndarray:
    """(b, DIM) statistics of a batch of ``(b, 3, s, s)`` pixels (or NaFlex ``Patches``, put
    back on their grid): uint8 as the reader ships them, or float normalised by
    ``preprocess`` (its ``mean``, ``std``, ``rescale`` undone)."""
    import torch

    from medsig.data.patches import Patches
    from medsig.data.transforms import to_uint8_image

    images = pixels.images() if isinstance(pixels, Patches) else torch.as_tensor(pixels)
    if len(images) == 0:
        return np.zeros((0, DIM), np.float32)
    return np.stack([image_stats(to_uint8_image(x, preprocess).permute(1, 2, 0)
                                 .numpy()) for x in images])


def collection_stats(paths: list, rows: list[int], preprocess: Any, batch_size: int = 64,
                     num_workers: int | None = None, draft_size: int | None = None
                     ) -> tuple[np.ndarray, list[int]]:
    """Statistics of ``rows`` read as the encoder reads them (``medsig.data.reader``; uint8
    pixels where the preprocessing allows): ((n_kept, DIM), kept rows)."""
    from medsig.data.reader import read_batches

    stats, kept = [], []
    for b in read_batches(paths, rows, preprocess, batch_size, num_workers,
                          draft_size=draft_size, uint8=bool(getattr(preprocess, "splits",
                                                                    False))):
        if b.rows:
            stats.append(pixel_stats(b.pixels, preprocess))
            kept.extend(b.rows)
    return (np.concatenate(stats) if stats else np.zeros((0, DIM), np.float32)), kept
