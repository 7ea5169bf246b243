"""Quality gates for decoded radiographs: pure functions, plus a small cross-source deduplicator.

The decoders (`decode_*.py`) call the per-image gates and turn a failed one into a `Rejected` with a reason code;
each gate lives here once so the rule and its justification are in one place:

* modality: only projection radiographs (CR, DX by default) are chest X-ray candidates; CT/MR/MG/OT
  slices or test patterns would teach the model a different image domain.
* anatomy: a header that names a non-chest body part (hip, C-spine, teeth, ...) is not a chest film.
* noise: a corrupt stream can decode without error into random values (the bad JPEG-lossless CT
  file here). Radiographs are smooth at the pixel scale: the lag-1 neighbour correlation is > 0.97
  for every real radiograph in the test data (0.82 for one shrunk to 16x16), ~0 for white noise and
  0.37 for that corrupt decode; the threshold 0.6 sits between.
* size: below a few hundred pixels an image cannot yield the 512 px training views without heavy
  upsampling (the 16x16 CR, the 169x211 veterinary DX).
* duplicates: the same radiograph appears in several public archives, sometimes re-encoded or
  resized; exact copies share the output pixel SHA-256, near copies a 64-bit DCT perceptual hash
  within a small Hamming distance.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from PIL import Image

DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX")
MIN_SIZE = 256
NOISE_CORRELATION = 0.6
NEAR_DUPLICATE_BITS = 6

# Word beginnings that mark a chest study, and non-chest anatomy seen in radiograph headers.
CHEST_WORDS: tuple[str, ...] = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX", "RIB", "STERN")
NON_CHEST_WORDS: tuple[str, ...] = (
    "ABDOM", "ANKLE", "ARM", "BREAST", "CSPINE", "DENT", "ELBOW", "EXTREMIT", "FEMUR", "FINGER", "FOOT",
    "HAND", "HEAD", "HIP", "KNEE", "LEG", "LSPINE", "MAMM", "PELVIS", "SHOULDER", "SKULL", "SPINE", "TEETH",
    "TIBIA", "TOOTH", "TSPINE", "WRIST",
)  # fmt: skip


def modality_allowed(modality: str | None, allowed: Iterable[str] | None) -> bool:
    """True when `allowed` is None (gate off) or holds the DICOM Modality (case-insensitive)."""
    if allowed is None:
        return True
    return (modality or "").strip().upper() in {m.upper() for m in allowed}


def _mentions(text: str, words: Iterable[str]) -> bool:
    """Whether a word of `text` starts with one of `words` (whole words: "SHIP" is not "HIP")."""
    tokens = re.findall(r"[A-Z]+", text.upper())
    return any(t.startswith(w) for t in tokens for w in words)


def is_chest_anatomy(body_part: str | None, descriptions: Iterable[str | None] = ()) -> bool:
    """False only when the header positively names non-chest anatomy.

    BodyPartExamined decides when it is filled: it must name the chest. When it is empty (NIH and
    SIIM exports often are), the free-text study/series/protocol descriptions reject only on a
    non-chest word without any chest word, so an unlabelled chest film is kept.
    """
    if (body_part or "").strip():
        return _mentions(body_part, CHEST_WORDS)
    text = " ".join(d for d in descriptions if d)
    return _mentions(text, CHEST_WORDS) or not _mentions(text, NON_CHEST_WORDS)


# Values per block of rows in `neighbour_correlation`: the block's float64 copy (2 MiB) stays in
# cache, and the blocks are few enough that the per-call overhead does not count (measured best
# among 2**13 .. 2**20 on 1-4 Mpixel images).
_CORR_BLOCK_VALUES = 1 << 18


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product of 1-D float64 arrays in numpy's own loop: BLAS would start threads for long
    vectors, and in a pool of worker processes they fight over the cores (measured 5 ms vs 370 ms)."""
    return float(np.einsum("i,i->", a, b))


def neighbour_correlation(pixels: np.ndarray) -> float:
    """Mean of the horizontal and vertical lag-1 Pearson correlations (0.0 for a constant image).

    Computed from raw moments (sum, sum of squares, sum of lag-1 products) of the values shifted by
    a constant near their middle, in float64 blocks of rows that stay in cache: one pass over the
    pixels instead of a float64 copy and eight full-size temporaries. The shift leaves every
    correlation unchanged. For integer pixels of up to 16 bits (and up to 2**23 pixels) every
    product and sum is an exact integer in float64 whatever order they are added in, and the
    covariance and variances are then formed in exact integer arithmetic: the result is the exact
    correlation, rounded once.
    """
    x = np.asarray(pixels)
    if x.ndim != 2:
        raise ValueError(f"neighbour_correlation wants a 2-D array, got shape {x.shape}")
    if x.size == 0:
        return 0.0
    rows, cols = x.shape
    lo, hi = x.min(), x.max()
    exact = x.dtype.kind in "iub"
    shift = (int(lo) + int(hi)) // 2 if exact else (float(lo) + float(hi)) / 2

    def centred(a: np.ndarray) -> np.ndarray:
        return np.subtract(a, shift, dtype=np.float64)

    total = squares = horizontal = vertical = 0.0
    step = max(1, _CORR_BLOCK_VALUES // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = centred(x[r0 : min(rows, r1 + 1)])  # one row more: the vertical pairs across blocks
        own = block[: r1 - r0].ravel()
        total += float(own.sum())
        squares += _dot(own, own)
        # Lag-1 products along the flattened rows, less the pairs that wrap from one row to the next.
        horizontal += _dot(own[:-1], own[1:]) - _dot(block[: r1 - r0 - 1, -1], block[1 : r1 - r0, 0])
        vertical += _dot(block[:-1].ravel(), block[1:].ravel())
    first_col, last_col, first_row, last_row = (centred(v) for v in (x[:, 0], x[:, -1], x[0], x[-1]))

    def pearson(n: int, products: float, drop_a: np.ndarray, drop_b: np.ndarray) -> float:
        """Correlation of a = all values but `drop_a` with b = all but `drop_b` (n pairs, lag-1 `products`)."""
        if n == 0:
            return 0.0
        sa, sb = total - float(drop_a.sum()), total - float(drop_b.sum())
        qa, qb = squares - _dot(drop_a, drop_a), squares - _dot(drop_b, drop_b)
        moments = (products, sa, sb, qa, qb)
        if exact:
            products, sa, sb, qa, qb = (round(m) for m in moments)
        # n^2 times the covariance and the variances: exact (Python ints) for integer pixels.
        cov, var_a, var_b = n * products - sa * sb, n * qa - sa * sa, n * qb - sb * sb
        if not exact and min(var_a, var_b) <= 1e-12 * n * max(qa, qb):
            return 0.0  # constant up to rounding
        return float(cov / math.sqrt(var_a * var_b)) if var_a > 0 and var_b > 0 else 0.0

    corrs = [
        pearson(rows * (cols - 1), horizontal, last_col, first_col),  # a = x[:, :-1], b = x[:, 1:]
        pearson((rows - 1) * cols, vertical, last_row, first_row),  # a = x[:-1, :], b = x[1:, :]
    ]
    return float(np.mean(corrs))


def is_blank(pixels: np.ndarray) -> bool:
    """A constant image carries nothing to learn (an empty or fully saturated decode)."""
    x = np.asarray(pixels)
    return x.size == 0 or bool(x.min() == x.max())


def is_noise(pixels: np.ndarray, threshold: float = NOISE_CORRELATION) -> bool:
    """True when neighbouring pixels are barely correlated: a decode into noise, not a radiograph."""
    return neighbour_correlation(pixels) < threshold


def is_too_small(shape: tuple[int, ...], min_size: int = MIN_SIZE) -> bool:
    """True when the shorter side is below `min_size` pixels."""
    return min(shape[:2]) < min_size


def pixel_sha256(array: np.ndarray) -> str:
    """SHA-256 of shape, dtype and C-order bytes: equal only for the very same pixel array."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")  # the bytes of a.tobytes(), without the copy
    return h.hexdigest()


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, so that D @ x is the DCT of a length-n column."""
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(image: np.ndarray, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit DCT pHash (Zauner 2010; the scheme of `imagehash.phash`): low-frequency DCT signs vs their median.

    The image is area-averaged (box filter) to 32x32 first, so the hash ignores size, re-encoding noise and
    any positive affine change of intensity (uint8 and uint16 outputs hash alike). The values differ from
    imagehash's (which resizes with ANTIALIAS and uses scipy's unnormalised DCT): compare hashes made here.
    """
    n = hash_size * highfreq_factor
    x = np.asarray(image, np.float32)
    small = np.asarray(Image.fromarray(x).resize((n, n), Image.Resampling.BOX), np.float64)
    d = _dct_matrix(n)
    low = (d @ small @ d.T)[:hash_size, :hash_size]
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return (a ^ b).bit_count()


class Duplicate(NamedTuple):
    """Which kept item a new one duplicates, and how closely (distance 0 with exact=True: same pixels)."""

    kept_id: str
    exact: bool
    distance: int


class Deduplicator:
    """First-seen-wins exact and near-duplicate filter over output images, across sources.

    Near duplicates are found by multi-index hashing: the 64 bits are cut into threshold + 1 bands,
    and two hashes within `threshold` bits agree exactly on at least one band (pigeonhole), so only
    items sharing a band are compared; lookup stays fast on millions of images.
    """

    def __init__(self, threshold: int = NEAR_DUPLICATE_BITS, bits: int = 64):
        if not 0 <= threshold < bits:
            raise ValueError(f"threshold must be in [0, {bits}), got {threshold}")
        self.threshold = threshold
        edges = [round(i * bits / (threshold + 1)) for i in range(threshold + 2)]
        self._bands = list(itertools.pairwise(edges))
        self._by_sha: dict[str, str] = {}
        self._by_band: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._kept: list[tuple[str, int]] = []

    def __len__(self) -> int:
        return len(self._kept)

    def _keys(self, phash: int) -> list[int]:
        return [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def find(self, sha256: str, phash: int) -> Duplicate | None:
        """The kept item this one duplicates (exact first, else the nearest, earliest on ties), or None."""
        if sha256 in self._by_sha:
            return Duplicate(self._by_sha[sha256], True, 0)
        candidates = {i for band, key in zip(self._by_band, self._keys(phash)) for i in band.get(key, ())}
        scored = sorted((hamming(phash, self._kept[i][1]), i) for i in candidates)
        if scored and scored[0][0] <= self.threshold:
            return Duplicate(self._kept[scored[0][1]][0], False, scored[0][0])
        return None

    def add(self, item_id: str, sha256: str, phash: int) -> None:
        """Keep an item: later exact or near copies of it will be reported as its duplicates."""
        index = len(self._kept)
        self._kept.append((item_id, phash))
        self._by_sha.setdefault(sha256, item_id)
        for band, key in zip(self._by_band, self._keys(phash)):
            band.setdefault(key, []).append(index)

    def check(self, item_id: str, image: np.ndarray) -> Duplicate | None:
        """Return the duplicate match of `image`, or keep it (returning None): first seen wins."""
        sha, phash = pixel_sha256(image), perceptual_hash(image)
        match = self.find(sha, phash)
        if match is None:
            self.add(item_id, sha, phash)
        return match
