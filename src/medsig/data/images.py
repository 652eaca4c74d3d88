"""One image loader for every path: files or bytes, photos, 16-bit scans and DICOM.

``load_image`` returns an RGB PIL image or raises :class:`~medsig.errors.ImageError` with a
short reason (``missing``, ``empty``, ``truncated``, ``not_an_image``, ``too_large``,
``unreadable``, ``not_a_file``, ``outside_root``) that readers count as skips.

Only regular files are read (a FIFO, a device such as ``/dev/zero`` or a folder is
``not_a_file``, never a hang), and the byte cap is checked on the open file before reading.
A :class:`RootedPath` (what a collection hands out) must resolve, symlinks included, inside
its image root at the moment it is read, else ``outside_root``.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from medsig.errors import ImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # larger image files are refused before reading
_DICOM_MAGIC_OFFSET = 128

_SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"DICM", _DICOM_MAGIC_OFFSET, "dicom"),
]


_MESSAGES = {"missing": "image file not found", "empty": "image file is empty",
             "truncated": "image data is truncated", "not_an_image": "not an image",
             "too_large": "image too large (decompression-bomb limit)",
             "unreadable": "image could not be decoded",
             "not_a_file": "not a regular file", "outside_root": "path outside the image root"}


class RootedPath(type(Path())):  # type: ignore[misc]
    """A path that must resolve inside ``image_root`` when it is read (see ``load_image``).

    Behaves as a plain path everywhere else; pickles with its root (DataLoader workers).
    """

    image_root: str | None = None  # derived paths (parent, with_suffix, ...) carry none

    @classmethod
    def under(cls, root: str | Path, path: str | Path) -> RootedPath:
        out = cls(path)
        out.image_root = os.path.realpath(root)
        return out

    def __reduce__(self):  # noqa: ANN204
        return _rooted, (str(self), self.image_root)


def _rooted(path: str, root: str | None) -> Path:
    return RootedPath.under(root, path) if root is not None else Path(path)


def inside_root(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) inside ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _fail(reason: str, where: str, detail: str | None = None) -> ImageError:
    message = _MESSAGES[reason] + (f" ({detail})" if detail else "")
    return ImageError(reason, message, file=where)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes (never the file name), or None."""
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":  # before TIFF: dual files
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, offset, name in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read, without reading it: ``outside_root``, ``missing``,
    ``not_a_file`` or None (a regular file, inside its root when it is a RootedPath)."""
    if "\x00" in str(path):
        return "missing"
    root = getattr(path, "image_root", None)
    if root is not None and not inside_root(path, root):
        return "outside_root"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent, a dangling link, a folder we may not enter
        return "missing"
    return None if stat.S_ISREG(mode) else "not_a_file"


def _read_bytes(source: str | Path | bytes, max_bytes: int | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if max_bytes is not None and len(source) > max_bytes:
            raise _fail("too_large", "upload", detail=f"{len(source)} bytes > {max_bytes}")
        return bytes(source), "upload"
    where = str(source)
    path = where
    if "\x00" in where:  # no file system has it: os calls would raise ValueError
        raise _fail("missing", where.replace("\x00", "\\0"), detail="NUL byte in the path")
    root = getattr(source, "image_root", None)
    if root is not None:
        if not inside_root(where, root):
            raise _fail("outside_root", where, detail=f"root {root}")
        path = os.path.realpath(where)  # open what was checked, not a swappable link
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # FIFO, device, folder, socket
            raise _fail("not_a_file", where)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _fail("missing", where) from None
    except ImageError:
        raise
    except OSError as exc:
        raise _fail("unreadable", where, detail=exc.strerror or str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):  # replaced between stat and open
            raise _fail("not_a_file", where)
        if max_bytes is not None and info.st_size > max_bytes:
            raise _fail("too_large", where, detail=f"{info.st_size} bytes > {max_bytes}")
        try:
            data = f.read(max_bytes + 1 if max_bytes is not None else -1)
        except OSError as exc:
            raise _fail("unreadable", where, detail=exc.strerror or str(exc)) from None
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise _fail("too_large", where, detail=f"more than {max_bytes} bytes")
    return data, where


def load_image(source: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES
               ) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an RGB image.

    ``max_pixels`` rejects decompression bombs before decoding; ``max_bytes`` rejects larger
    files before reading them. ``draft_size`` lets JPEG decode at a reduced scale (a power of
    two, never below ``draft_size`` on the short side), which is several times faster for
    large photos fed to a small model.
    """
    data, where = _read_bytes(source, max_bytes)
    if not data:
        raise _fail("empty", where)
    if sniff_format(data) == "dicom" or where.lower().endswith((".dcm", ".dicom")):
        return _load_dicom(data, where, max_pixels, force=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, max_pixels, where)
            if draft_size and image.format == "JPEG":
                image.draft("RGB", _draft_target(image.size, draft_size))
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail("too_large", where) from None
    except UnidentifiedImageError:
        raise _fail("not_an_image", where) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if _looks_truncated(exc) else "unreadable"
        raise _fail(reason, where, detail=str(exc).splitlines()[0][:120]) from None
    return to_rgb(image)


def _draft_target(size: tuple[int, int], target: int) -> tuple[int, int]:
    w, h = size
    scale = max(target / max(min(w, h), 1), 1e-6)
    return max(int(w * scale), 1), max(int(h * scale), 1)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, where: str) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise _fail("too_large", where,
                         detail=f"{size[0]}x{size[1]} px > {max_pixels} allowed")


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("truncated", "premature end", "broken data stream",
                                   "image file is truncated", "unexpected end", "not enough"))


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF-orient and convert any PIL mode to 8-bit RGB (alpha composited on black)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_rgb(np.asarray(image, dtype=np.float64))
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _scale_to_rgb(values: np.ndarray, low: float | None = None, high: float | None = None,
                  invert: bool = False) -> Image.Image:
    """Linearly map [low, high] (default: the image's min/max) to 0-255 grayscale RGB."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if low is None and finite.size else (low or 0.0)
    hi = float(finite.max()) if high is None and finite.size else (high or 1.0)
    scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if invert:
        scaled = 1.0 - scaled
    out = (scaled * 255.0 + 0.5).astype(np.uint8)
    if out.ndim == 2:
        return Image.fromarray(out, mode="L").convert("RGB")
    return Image.fromarray(out[..., :3], mode="RGB")


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) \
            else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _load_dicom(data: bytes, where: str, max_pixels: int | None, force: bool = False
                ) -> Image.Image:
    """DICOM → RGB: rescale slope/intercept, VOI window when present, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(int(getattr(ds, "NumberOfFrames", 1) or 1), 1)
        _check_pixels((cols, rows * frames), max_pixels, where)  # every frame is decoded
        pixels = ds.pixel_array
    except ImageError:
        raise
    except (InvalidDicomError, AttributeError):  # AttributeError: no Rows, so no image
        raise _fail("not_an_image", where) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        reason = "truncated" if "length" in text.lower() or "buffer" in text.lower() \
            or "truncat" in text.lower() else "unreadable"
        raise _fail(reason, where, detail=f"DICOM: {text}") from None
    if pixels.ndim == 4:  # multi-frame colour: first frame
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if pixels.ndim == 3 and frames > 1 and photometric.startswith("MONO"):
        pixels = pixels[0]
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and pixels.ndim == 3:
        from pydicom.pixels import convert_color_space

        try:
            pixels = convert_color_space(pixels, photometric, "RGB")
        except Exception:  # noqa: BLE001 - leave the values as decoded
            pass
    if pixels.ndim == 3 and pixels.shape[-1] >= 3:
        if pixels.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
        return _scale_to_rgb(pixels)
    values = pixels.astype(np.float64)
    slope, intercept = _first(getattr(ds, "RescaleSlope", None)), \
        _first(getattr(ds, "RescaleIntercept", None))
    values = values * (slope if slope is not None else 1.0) + (intercept or 0.0)
    center, width = _first(getattr(ds, "WindowCenter", None)), \
        _first(getattr(ds, "WindowWidth", None))
    low = high = None
    if center is not None and width is not None and width > 1:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return _scale_to_rgb(values, low, high, invert=photometric == "MONOCHROME1")
