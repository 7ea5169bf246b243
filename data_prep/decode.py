"""Decode DICOM, PNG and JPEG chest radiographs into display-oriented images with metadata.

Every output has the same polarity, dark lungs and bright bone (what radiologists read), because
the model must not learn two opposite appearances of one anatomy.

The decoders live in modules of their own: `decode_dicom` (DICOM and ACR-NEMA: header and pixel
gates, Modality LUT, VOI and polarity rules), `decode_image` (PNG/JPEG) and `decode_jsrt` (the JSRT
raw .IMG files), with the types and gates they share in `decode_common`. This module picks the
decoder of a file (`decode_file`), makes the output image (`to_output`) and converts batches.

Bad input raises `Rejected(reason, message)`; `convert_files` turns every item of a batch into an
`Outcome`, so no file can stop a batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from data_prep import quality
from data_prep.decode_common import METADATA_KEYS, Decoded, Rejected
from data_prep.decode_dicom import decode_dicom
from data_prep.decode_image import decode_image
from data_prep.decode_jsrt import decode_jsrt_raw, is_jsrt_raw

# The entry points; the types and per-format decoders are re-exported for the users of this module.
__all__ = [
    "METADATA_KEYS",
    "Decoded",
    "Outcome",
    "Rejected",
    "convert_file",
    "convert_files",
    "decode_dicom",
    "decode_file",
    "decode_image",
    "decode_jsrt_raw",
    "output_shape",
    "to_output",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One batch item: an image with metadata, or a rejection reason and message."""

    path: str
    image: np.ndarray | None = None
    metadata: dict[str, Any] | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


# ---------------------------------------------------------------------------------------------- output


def output_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(rows, cols) with the shorter side exactly `size` and the aspect ratio kept."""
    h, w = shape
    if h <= w:
        return size, max(1, round(w * size / h))
    return max(1, round(h * size / w)), size


def to_output(decoded: Decoded, size: int = 512, dtype: str = "uint8") -> np.ndarray:
    """Antialiased (Lanczos on float) resize to shorter side `size`, then [0, 1] -> [0, dtype max]."""
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype must be uint8 or uint16, got {dtype!r}")
    rows, cols = output_shape(decoded.pixels.shape, size)
    img = Image.fromarray(np.asarray(decoded.pixels, np.float32))
    resized = np.asarray(img.resize((cols, rows), Image.Resampling.LANCZOS), np.float64)
    top = np.iinfo(dtype).max
    return np.round(np.clip(resized, 0.0, 1.0) * top).astype(dtype)


def _is_image_file(path: str | os.PathLike) -> bool:
    """PNG/JPEG by signature (then suffix); everything else is tried as DICOM (ACR-NEMA has no magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return False
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff")) or os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def decode_file(path: str | os.PathLike, **gates: Any) -> Decoded:
    """decode_image for PNG/JPEG, decode_jsrt_raw for a JSRT .IMG, decode_dicom for anything else; `gates`
    go to the decoder."""
    image_gates = {k: v for k, v in gates.items() if k in ("min_size", "noise_threshold", "source")}
    if is_jsrt_raw(path):
        return decode_jsrt_raw(path, **image_gates)
    if _is_image_file(path):
        return decode_image(path, **image_gates)
    return decode_dicom(path, **gates)


def convert_file(
    path: str | os.PathLike, *, size: int = 512, dtype: str = "uint8", **gates: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """One file -> (output image, metadata with output size, pixel_sha256 and perceptual hash)."""
    decoded = decode_file(path, **gates)
    image = to_output(decoded, size, dtype)
    meta = decoded.metadata | {
        "output_size": image.shape,
        "output_dtype": dtype,
        "pixel_sha256": quality.pixel_sha256(image),
        "phash": f"{quality.perceptual_hash(image):016x}",
    }
    return image, meta


def convert_files(
    paths: Iterable[str | os.PathLike],
    *,
    size: int = 512,
    dtype: str = "uint8",
    dedup: quality.Deduplicator | None = None,
    **gates: Any,
) -> Iterator[Outcome]:
    """One Outcome per path, in order; nothing a file contains can stop the batch."""
    for path in paths:
        name = os.fspath(path)
        try:
            image, meta = convert_file(path, size=size, dtype=dtype, **gates)
        except Rejected as e:
            yield Outcome(name, reason=e.reason, message=e.message)
            continue
        except Exception as e:  # a decoder bug must not end the batch either
            yield Outcome(name, reason="error", message=f"{name}: unexpected {type(e).__name__}: {e}")
            continue
        if dedup is not None:
            item_id = f"{meta['source']}:{name}" if meta["source"] else name
            match = dedup.find(meta["pixel_sha256"], int(meta["phash"], 16))
            if match is not None:
                kind = "duplicate" if match.exact else "near_duplicate"
                msg = f"{name}: {kind} of {match.kept_id} (Hamming {match.distance})"
                yield Outcome(name, reason=kind, message=msg)
                continue
            dedup.add(item_id, meta["pixel_sha256"], int(meta["phash"], 16))
        yield Outcome(name, image=image, metadata=meta)
