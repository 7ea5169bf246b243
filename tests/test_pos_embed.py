"""Position-embedding resampling against PyTorch's bicubic F.interpolate (DINOv2's exact rule).

DINOv2's interpolate_pos_encoding calls
    F.interpolate(grid_nchw, mode="bicubic", scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), antialias=False)
with align_corners=False, so coordinates follow the scale factor, not the output size.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_TEACHER, golden

from chexfound_jax.convert import torch_io
from chexfound_jax.models.pos_embed import bicubic_matrix, interpolate_pos_embed, resample_patch_grid

torch = pytest.importorskip("torch")
F = torch.nn.functional

M = 32  # stored grid side (img_size 512 / patch 16)
PATCH = 16
OFFSET = 0.1
DIM = 8
SIZES = [(144, 144), (224, 224), (448, 448), (512, 448)]  # (H, W) in pixels
IDS = [f"{h}x{w}" for h, w in SIZES]


@pytest.fixture(scope="module")
def grid():
    """Random unit-variance (M, M, DIM) patch grid, float64."""
    return np.random.default_rng(0).standard_normal((M, M, DIM))


def torch_dinov2_resample(grid: np.ndarray, h0: int, w0: int, dtype=torch.float64) -> np.ndarray:
    """DINOv2's call, verbatim: (M, M, D) -> (h0, w0, D)."""
    x = torch.from_numpy(np.ascontiguousarray(grid)).to(dtype).permute(2, 0, 1)[None]
    out = F.interpolate(
        x,
        mode="bicubic",
        scale_factor=((h0 + OFFSET) / M, (w0 + OFFSET) / M),
        align_corners=False,
        antialias=False,
    )
    assert out.shape[-2:] == (h0, w0)
    return out[0].permute(1, 2, 0).numpy()


def test_bicubic_matrix_rows_sum_to_one():
    for n in (9, 14, 28, 32, 40):
        mat = bicubic_matrix(M, n, M / (n + OFFSET))
        assert mat.shape == (n, M)
        np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-14)


@pytest.mark.parametrize(("height", "width"), SIZES, ids=IDS)
def test_matrices_match_torch_float64(grid, height, width):
    h0, w0 = height // PATCH, width // PATCH
    rows = bicubic_matrix(M, h0, M / (h0 + OFFSET))  # rows follow H
    cols = bicubic_matrix(M, w0, M / (w0 + OFFSET))
    ours = np.einsum("yi,xj,ijd->yxd", rows, cols, grid)
    ref = torch_dinov2_resample(grid, h0, w0)
    assert ours.shape == (h0, w0, DIM)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("height", "width"), SIZES, ids=IDS)
def test_resample_patch_grid_matches_torch_float32(grid, height, width):
    h0, w0 = height // PATCH, width // PATCH
    g32 = grid.astype(np.float32)
    ours = np.asarray(jax.jit(lambda g: resample_patch_grid(g, (h0, w0), OFFSET))(g32))
    # Reference: torch in float64 on the same float32 values. (torch's own float32 bicubic is the
    # less accurate of the two here: up to ~1e-5 off its float64 result, ours ~5e-7.)
    ref = torch_dinov2_resample(g32.astype(np.float64), h0, w0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, torch_dinov2_resample(g32, h0, w0, torch.float32), rtol=0, atol=2e-5)


def test_zero_offset_is_size_based(grid):
    """offset 0: DINOv2 passes size=(h0, w0), i.e. the mapping M / n."""
    g32 = grid.astype(np.float32)
    ours = np.asarray(resample_patch_grid(g32, (14, 11), 0.0))
    x = torch.from_numpy(g32).permute(2, 0, 1)[None]
    ref = F.interpolate(x.double(), size=(14, 11), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), SIZES, ids=IDS)
def test_interpolate_pos_embed_keeps_class_position(grid, height, width):
    rng = np.random.default_rng(1)
    cls_pos = rng.standard_normal((1, 1, DIM)).astype(np.float32)
    pos = np.concatenate([cls_pos, grid.astype(np.float32).reshape(1, M * M, DIM)], axis=1)
    out = np.asarray(interpolate_pos_embed(jnp.asarray(pos), height, width, PATCH, OFFSET))
    h0, w0 = height // PATCH, width // PATCH
    assert out.shape == (1, 1 + h0 * w0, DIM)
    np.testing.assert_array_equal(out[:, 0], cls_pos[:, 0])
    ref = torch_dinov2_resample(pos[0, 1:].reshape(M, M, DIM).astype(np.float64), h0, w0).reshape(1, h0 * w0, DIM)
    np.testing.assert_allclose(out[:, 1:], ref, rtol=0, atol=1e-5)


def test_native_square_size_is_identity(grid):
    pos = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1 + M * M, DIM)), jnp.float32)
    assert interpolate_pos_embed(pos, 512, 512, PATCH, OFFSET) is pos
    # Same patch count but not square (e.g. 1024 x 256) is resampled, as in DINOv2.
    out = interpolate_pos_embed(pos, 1024, 256, PATCH, OFFSET)
    assert out.shape == (1, 1 + 64 * 16, DIM)


@pytest.fixture(scope="module")
def teacher_pos_embed():
    return torch_io.read_checkpoint(TINY_TEACHER)["teacher"]["backbone.pos_embed"]


@pytest.mark.parametrize(("key", "height", "width"), [("224", 224, 224), ("144", 144, 144), ("512x448", 512, 448)])
def test_matches_official_golden(teacher_pos_embed, key, height, width):
    gold = golden("backbone")
    readme = json.loads(str(gold["README"]))
    assert "interpolate_offset 0.1" in readme["setup"]
    expected = gold[f"pos_embed_{key}"]
    assert teacher_pos_embed.shape == (1, 1 + M * M, 64)
    out = np.asarray(interpolate_pos_embed(jnp.asarray(teacher_pos_embed), height, width, PATCH, OFFSET))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_jax_image_resize_is_not_the_official_rule(teacher_pos_embed):
    """jax.image.resize (Keys a=-0.5, size-based, antialiased) is far from DINOv2's resampling."""
    gold = golden("backbone")["pos_embed_224"]
    grid = jnp.asarray(teacher_pos_embed[0, 1:].reshape(M, M, -1))
    approx = np.asarray(jax.image.resize(grid, (14, 14, grid.shape[-1]), method="bicubic")).reshape(1, 196, -1)
    assert np.abs(approx - gold[:, 1:]).max() > 0.05
