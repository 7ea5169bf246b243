"""PNG/JPEG decoding: ordinary raster radiographs, read with Pillow; separate from the DICOM and JSRT decoders.

PNG/JPEG: 8-/16-bit gray or RGB with equal channels, assumed display-ready (bright bone); 16-bit
data is scaled by the smallest bit depth (>= 8) that holds its maximum, as PNG has no Bits Stored.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_prep import quality
from data_prep.decode_common import (
    METADATA_KEYS,
    RGB_TOLERANCE,
    Decoded,
    Rejected,
    _gray,
    pixel_gates,
    size_gate,
    unit_pixels,
)


def _image_array(img: Image.Image, name: str) -> tuple[np.ndarray, int]:
    """Pixel array (gray 2-D or RGB(A)) and its bit depth from a PIL image."""
    if img.mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGBA" if img.mode == "P" else "RGB" if img.mode != "1" else "L")
    if img.mode == "LA":
        img = img.getchannel("L")
    arr = np.asarray(img)
    if img.mode in ("L", "RGB", "RGBA"):
        return arr, 8
    if img.mode.startswith("I"):
        arr = arr.astype(np.int64)
        if arr.min() < 0:
            raise Rejected("decode_error", f"{name}: negative values in {img.mode} image")
        return arr, max(8, int(arr.max()).bit_length())
    raise Rejected("not_grayscale", f"{name}: unsupported image mode {img.mode!r}")


def decode_image(
    path: str | os.PathLike,
    *,
    min_size: int = quality.MIN_SIZE,
    noise_threshold: float = quality.NOISE_CORRELATION,
    source: str = "",
) -> Decoded:
    """A PNG/JPEG radiograph (8/16-bit gray, or RGB with equal channels) -> Decoded, or Rejected."""
    name = os.fspath(path)
    arr, bits, fmt = read_image(path)
    gray = _gray(arr, name, RGB_TOLERANCE * (2**bits - 1) / 255)
    corr = pixel_gates(gray, name, noise_threshold)
    pixels = unit_pixels(gray, bits)
    size_gate(pixels.shape, name, min_size)
    meta = dict.fromkeys(METADATA_KEYS) | {
        "source": source,
        "path": name,
        "format": fmt,
        "image_id": os.path.splitext(os.path.basename(name))[0],
        "photometric": "MONOCHROME2",
        "bits_stored": bits,
        "original_size": (int(pixels.shape[0]), int(pixels.shape[1])),
        "window_source": "full_range",
        "stale_window": False,
        "inverted": False,
        "neighbour_correlation": round(corr, 4),
        "source_pixel_sha256": quality.pixel_sha256(gray),
    }
    return Decoded(pixels, meta)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, int, str]:
    """(pixel array, bit depth, lower-case format) of a PNG/JPEG, or Rejected (unreadable / truncated)."""
    name = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            fmt = (img.format or "").lower()
            arr, bits = _image_array(img, name)
    except Rejected:
        raise
    except Exception as e:
        reason = "truncated" if "truncated" in str(e).lower() else "unreadable"
        raise Rejected(reason, f"{name}: not readable as an image ({type(e).__name__}: {e})") from e
    return arr, bits, fmt
