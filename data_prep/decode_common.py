"""What every decoder shares: `Rejected`, `Decoded` and its metadata keys, the gray check, the pixel and size gates and
the [0, 1] scaling; a module of its own so that the DICOM, image and JSRT decoders need not import each other."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_prep import quality

RGB_TOLERANCE = 4  # max channel difference (8-bit levels) still called gray: JPEG chroma noise

# Every Decoded.metadata has these keys (None where unknown), whatever the input format.
METADATA_KEYS: tuple[str, ...] = (
    "source", "path", "format", "patient_id", "study_id", "series_id", "image_id", "modality", "sop_class",
    "body_part", "view_position", "photometric", "presentation_lut_shape", "intensity_sign", "bits_stored",
    "original_size", "pixel_spacing", "transfer_syntax", "window_source", "window", "stale_window", "inverted",
    "polarity_source", "neighbour_correlation", "source_pixel_sha256",
)  # fmt: skip


class Rejected(Exception):
    """An input that yields no image: `reason` is a machine-readable code, `message` names the file.

    Codes: unreadable, no_pixel_data, truncated, decode_error, modality, body_part, multi_frame,
    not_grayscale, blank, noise, too_small; `convert_files` adds duplicate, near_duplicate, error.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Display-oriented pixels (float32 in [0, 1], 2-D, bright bone) and JSON-friendly metadata."""

    pixels: np.ndarray
    metadata: dict[str, Any]


def _gray(pixels: np.ndarray, name: str, tolerance: float) -> np.ndarray:
    """2-D gray from gray or RGB(A) with equal channels (within `tolerance`); else not_grayscale."""
    if pixels.ndim == 2:
        return pixels
    rgb = pixels[..., :3].astype(np.int32)
    spread = int(np.abs(rgb - rgb[..., :1]).max())
    if spread > tolerance:
        raise Rejected("not_grayscale", f"{name}: colour image (channels differ by up to {spread})")
    return rgb.mean(axis=-1).astype(np.float32)


def pixel_gates(pixels: np.ndarray, name: str, noise_threshold: float) -> float:
    """Blank and noise gates on the stored values; returns the neighbour correlation."""
    if quality.is_blank(pixels):
        raise Rejected("blank", f"{name}: constant image")
    corr = quality.neighbour_correlation(pixels)
    if corr < noise_threshold:
        raise Rejected("noise", f"{name}: decodes to noise (neighbour correlation {corr:.2f} < {noise_threshold})")
    return corr


def size_gate(shape: tuple[int, ...], name: str, min_size: int) -> None:
    if quality.is_too_small(shape, min_size):
        raise Rejected("too_small", f"{name}: {shape[0]}x{shape[1]} below {min_size} px on the shorter side")


def unit_pixels(gray: np.ndarray, bits: int) -> np.ndarray:
    """Gray values of a `bits`-deep image -> float32 in [0, 1] (a table lookup for integer pixels)."""
    top = 2**bits - 1
    if gray.dtype.kind in "iu" and bits <= 16:  # _image_array checked the values are in [0, top]
        return (np.arange(top + 1, dtype=np.float64) / top).astype(np.float32)[gray]
    return (np.asarray(gray, np.float64) / top).astype(np.float32)
