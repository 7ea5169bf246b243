"""JSRT raw .IMG decoding: the headerless 12-bit files of the JSRT chest database, separate from the DICOM and
PNG/JPEG decoders because they carry no format of their own.

JSRT raw .IMG (the JSRT chest database's original files): no header, 2048x2048 big-endian 16-bit
words holding 12-bit values that grow with film density, so 0 is white (the inverse of a display
image, like MONOCHROME1; the common preprocessing of the set computes 1 - v/4096). A file is read
this way only when its name ends in .img and its size is exactly that of such an image; any other
.img file goes to the DICOM reader as before (old ACR-NEMA files often carry that suffix).
"""

from __future__ import annotations

import os

import numpy as np

from data_prep import quality
from data_prep.decode_common import METADATA_KEYS, Decoded, Rejected, pixel_gates, size_gate, unit_pixels

JSRT_SHAPE = (2048, 2048)
JSRT_BITS = 12
JSRT_PIXEL_SPACING = (0.175, 0.175)  # mm


def is_jsrt_raw(path: str | os.PathLike) -> bool:
    """A headerless JSRT .IMG: the suffix, the exact byte count of 2048x2048 16-bit words, no DICOM magic."""
    if not os.fspath(path).lower().endswith(".img"):
        return False
    try:
        if os.path.getsize(path) != JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2:
            return False
        with open(path, "rb") as f:
            return f.read(132)[128:132] != b"DICM"
    except OSError:
        return False


def decode_jsrt_raw(
    path: str | os.PathLike,
    *,
    inverted: bool = True,
    min_size: int = quality.MIN_SIZE,
    noise_threshold: float = quality.NOISE_CORRELATION,
    source: str = "",
) -> Decoded:
    """A JSRT raw .IMG -> Decoded (full 12-bit range; `inverted`: 0 is white, as the release stores it)."""
    name = os.fspath(path)
    try:
        stored = np.fromfile(path, dtype=">u2").astype(np.uint16)
    except OSError as e:
        raise Rejected("unreadable", f"{name}: not readable ({type(e).__name__}: {e})") from e
    if stored.size != JSRT_SHAPE[0] * JSRT_SHAPE[1]:
        expected = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
        raise Rejected("truncated", f"{name}: {stored.size * 2} bytes, a JSRT raw image has {expected}")
    stored = stored.reshape(JSRT_SHAPE)
    if int(stored.max()) >= 2**JSRT_BITS:
        raise Rejected("decode_error", f"{name}: value {int(stored.max())} exceeds 12 bits; not a JSRT raw image")
    corr = pixel_gates(stored, name, noise_threshold)
    pixels = unit_pixels(stored, JSRT_BITS)
    pixels = 1.0 - pixels if inverted else pixels
    size_gate(pixels.shape, name, min_size)
    meta = dict.fromkeys(METADATA_KEYS) | {
        "source": source,
        "path": name,
        "format": "jsrt_raw",
        "image_id": os.path.splitext(os.path.basename(name))[0],
        "photometric": "MONOCHROME1" if inverted else "MONOCHROME2",
        "bits_stored": JSRT_BITS,
        "original_size": JSRT_SHAPE,
        "pixel_spacing": JSRT_PIXEL_SPACING,
        "window_source": "full_range",
        "stale_window": False,
        "inverted": inverted,
        "polarity_source": "jsrt_raw",
        "neighbour_correlation": round(corr, 4),
        "source_pixel_sha256": quality.pixel_sha256(stored),
    }
    return Decoded(pixels, meta)
