"""Position-embedding resampling with DINOv2's exact rule (official `interpolate_pos_encoding`, vision_transformer.py).

DINOv2 calls `F.interpolate(mode="bicubic", scale_factor=(n + offset) / M)`: PyTorch's cubic
convolution with A = -0.75, clamped borders, no antialias, and source coordinates driven by
the scale factor rather than the target size. `jax.image.resize` uses Keys a = -0.5, size-based
coordinates and antialiasing, so the 1-D weight matrices are written out here and applied
separably. They depend only on static shapes, so they are numpy constants under `jit`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 tap weights for fractional offsets t, for taps at floor-1 .. floor+2."""

    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, inv_scale: float) -> np.ndarray:
    """(out_size, in_size) matrix of torch bicubic (align_corners=False) with a given 1/scale."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * inv_scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resample_patch_grid(grid: jax.Array, out_hw: tuple[int, int], offset: float) -> jax.Array:
    """Resamples a (M, M, D) grid to out_hw the way DINOv2's interpolate_pos_encoding does.

    With offset > 0 the scale factor is (n + offset) / M and sampling follows it; with offset 0
    DINOv2 passes the target size instead, giving the size-based mapping M / n.
    """
    in_h, in_w = grid.shape[:2]
    mats = []
    for n, m in zip(out_hw, (in_h, in_w)):
        inv_scale = m / (n + offset) if offset else m / n
        mats.append(jnp.asarray(bicubic_matrix(m, n, inv_scale), jnp.float32))
    out = jnp.einsum("yi,ijd->yjd", mats[0], grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("xj,yjd->yxd", mats[1], out, precision=jax.lax.Precision.HIGHEST)


def interpolate_pos_embed(pos_embed: jax.Array, height: int, width: int, patch_size: int, offset: float) -> jax.Array:
    """The (1, 1 + h*w, D) position embedding for an input of height x width pixels.

    Index 0 (the class position) is kept; the patch grid is resampled unless the input has the
    stored number of patches and is square, exactly DINOv2's early return.
    """
    num_stored = pos_embed.shape[1] - 1
    h0, w0 = height // patch_size, width // patch_size
    if h0 * w0 == num_stored and height == width:
        return pos_embed
    side = math.isqrt(num_stored)
    if side * side != num_stored:
        raise ValueError(f"pos_embed has {num_stored} patch positions, not a square grid")
    dim = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    patch = resample_patch_grid(grid, (h0, w0), offset).reshape(1, h0 * w0, dim)
    return jnp.concatenate([pos_embed[:, :1], patch.astype(pos_embed.dtype)], axis=1)
