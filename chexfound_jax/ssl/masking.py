"""iBOT block masks and their fixed-shape collate (official data/masking.py, collate.py), in numpy for the input
pipeline.

The official collate (`data/collate.py` + BEiT-style `data/masking.py`) emits variable-length lists
that the train step pads to `upperbound` rows. A compiled step needs fixed shapes, so here the padding
happens on the input side: every array has a shape that depends on the config only, and the official
`upperbound` (the largest count the targets allow) is the buffer size.

Randomness comes from a `np.random.Generator` passed in, never from global state, so grain workers stay
reproducible. Only `rng.random()` and `rng.integers(lo, hi)` are used, in the official order of draws, each
standing for `random.random()` / `random.randrange(lo, hi)`: an object that forwards those two calls to
Python's `random` reproduces the official masks bit for bit (the tests do so against the golden collate).
"""

from __future__ import annotations

import math

import numpy as np

Box = tuple[int, int, int, int]  # (top, left, height, width) of one accepted rectangle

_ATTEMPTS = 10  # official: rectangles tried per placement before giving up


def official_max_num_patches(img_size: int, patch_size: int) -> float:
    """`max_num_patches` as official train.py writes it: `0.5 * img_size // patch_size * img_size // patch_size`.

    The floor divisions make it differ from 0.5·N when (img_size / 2) is not a multiple of the patch size,
    e.g. 336/16 gives 210 rather than 220.5; 224, 448 and 512 at patch 16 give exactly 0.5·N.
    """
    return 0.5 * img_size // patch_size * img_size // patch_size


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """Python's `random.uniform(a, b)` = a + (b - a)·U[0, 1); defined for b < a too, which official relies on."""
    return a + (b - a) * rng.random()


def _place_block(
    rng: np.random.Generator,
    mask: np.ndarray,
    max_new: float,
    min_num_patches: float,
    log_aspect: tuple[float, float],
) -> tuple[Box, int] | None:
    """One official `_mask` call: up to 10 tries at a rectangle adding 1..max_new cells; updates `mask` in place."""
    height, width = mask.shape
    for _ in range(_ATTEMPTS):
        area = _uniform(rng, min_num_patches, max_new)
        aspect = math.exp(_uniform(rng, *log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if h < height and w < width:  # strict, as official: a block never spans the whole grid side
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            new = h * w - int(np.count_nonzero(mask[top : top + h, left : left + w]))
            if 0 < new <= max_new:
                mask[top : top + h, left : left + w] = True
                return (top, left, h, w), new
    return None


def block_mask_boxes(
    rng: np.random.Generator,
    grid_hw: tuple[int, int],
    num_masking_patches: int,
    min_num_patches: float = 4,
    max_num_patches: float | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> tuple[np.ndarray, list[Box]]:
    """Official BEiT-style block mask (H, W) bool, plus the accepted rectangles (so tests can check its shape).

    Rectangles are added until `num_masking_patches` cells are set or a round of 10 tries adds nothing, so
    it may undershoot but never overshoots. `max_num_patches` defaults to 0.5·N (official: `official_max_num_patches`).
    """
    height, width = grid_hw
    if max_num_patches is None:
        max_num_patches = 0.5 * height * width
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    boxes: list[Box] = []
    count = 0
    while count < num_masking_patches:
        placed = _place_block(rng, mask, min(num_masking_patches - count, max_num_patches), min_num_patches, log_aspect)
        if placed is None:
            break
        boxes.append(placed[0])
        count += placed[1]
    return mask, boxes


def block_mask(
    rng: np.random.Generator, grid_hw: tuple[int, int], num_masking_patches: int, **options: float | None
) -> np.ndarray:
    """Official BEiT-style block mask (H, W) bool with at most `num_masking_patches` cells set; `options` are
    `block_mask_boxes`' size and aspect bounds."""
    return block_mask_boxes(rng, grid_hw, num_masking_patches, **options)[0]


def mask_ratio_edges(mask_ratio: tuple[float, float], n_masked_images: int) -> np.ndarray:
    """`torch.linspace(*mask_ratio, n + 1)` (float32) bit for bit, so the upperbound matches official exactly.

    torch computes start + step·i for the first half and end − step·(steps − 1 − i) for the rest, each with one
    fused multiply-add (single rounding); float64 arithmetic rounded once to float32 reproduces that.
    """
    start, end = np.float32(mask_ratio[0]), np.float32(mask_ratio[1])
    steps = n_masked_images + 1
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64((end - start) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    head = np.float64(start) + step * i
    tail = np.float64(end) - step * (steps - 1 - i)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def _n_masked_images(n_global_images: int, mask_probability: float) -> int:
    return int(n_global_images * mask_probability)


def _token_bounds(edges: np.ndarray, num_tokens: int) -> list[int]:
    """Official per-image maximum int(N · edge_{i+1}), in float32 as the torch tensor arithmetic is."""
    return [int(np.float32(num_tokens) * e) for e in edges[1:]]


def max_masked_tokens(
    n_global_images: int,
    num_tokens: int,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> int:
    """Official `upperbound` = Σ_i int(N · edge_{i+1}): no batch can mask more, so it sizes the static buffers."""
    edges = mask_ratio_edges(mask_ratio, _n_masked_images(n_global_images, mask_probability))
    return sum(_token_bounds(edges, num_tokens))


def _draw_target(rng: np.random.Generator, lo: np.float32, hi: np.float32, num_tokens: int, bound: int) -> int:
    """Official target int(N · U(lo, hi)), in float32 as the torch tensor arithmetic is.

    Clipped to int(N · hi) so that a rounding corner can never push a batch past `max_masked_tokens`.
    """
    ratio = lo + (hi - lo) * np.float32(rng.random())
    return min(int(np.float32(num_tokens) * ratio), bound)


def _shuffled_order(rng: np.random.Generator, n: int) -> np.ndarray:
    """The permutation Python's `random.shuffle` applies (Fisher-Yates from the end), drawn from `rng`."""
    order = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def pack_masks(masks: np.ndarray, max_masked: int) -> dict[str, np.ndarray]:
    """(B, N) bool masks -> the official collate's index/weight lists, padded to `max_masked` rows.

    Indices follow `masks.flatten().nonzero()` (row-major: image, then token). Padding rows point at token 0
    with weight 0 and `mask_valid` False, so a gather stays in bounds and contributes nothing.
    """
    flat = np.flatnonzero(masks)
    n_masked = flat.size
    if n_masked > max_masked:
        raise ValueError(f"{n_masked} masked tokens exceed the buffer of {max_masked}")
    counts = masks.sum(axis=1)
    weights = (1.0 / np.maximum(counts, 1)).astype(np.float32)
    mask_indices = np.zeros(max_masked, dtype=np.int32)
    mask_indices[:n_masked] = flat
    mask_weights = np.zeros(max_masked, dtype=np.float32)
    mask_weights[:n_masked] = weights[flat // masks.shape[1]]
    return {
        "masks": masks.astype(bool),
        "mask_indices": mask_indices,
        "mask_weights": mask_weights,
        "mask_valid": np.arange(max_masked) < n_masked,
        "n_masked": np.asarray(n_masked, dtype=np.int32),
    }


def collate_masks(
    rng: np.random.Generator,
    n_global_images: int,
    grid_hw: tuple[int, int],
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    max_masked_tokens: int | None = None,
    *,
    max_num_patches: float | None = None,
) -> dict[str, np.ndarray]:
    """iBOT masks for one per-device batch of global crops, as fixed-shape arrays (see `pack_masks`).

    Official procedure: int(B·p) images get block masks with targets from consecutive ratio bins (each target
    drawn just before its mask), the rest are empty, and the list is shuffled as `random.shuffle` does.
    The buffer size defaults to the official `upperbound`.
    `max_num_patches` goes to the block generator (default 0.5·N; see `official_max_num_patches`).
    """
    height, width = grid_hw
    num_tokens = height * width
    if max_masked_tokens is None:
        max_masked_tokens = _upperbound(n_global_images, num_tokens, mask_ratio, mask_probability)
    edges = mask_ratio_edges(mask_ratio, _n_masked_images(n_global_images, mask_probability))
    masks = np.zeros((n_global_images, num_tokens), dtype=bool)
    for i, (lo, hi, bound) in enumerate(zip(edges[:-1], edges[1:], _token_bounds(edges, num_tokens))):
        target = _draw_target(rng, lo, hi, num_tokens, bound)
        masks[i] = block_mask(rng, grid_hw, target, max_num_patches=max_num_patches).reshape(-1)
    masks = masks[_shuffled_order(rng, n_global_images)]
    return pack_masks(masks, max_masked_tokens)


_upperbound = max_masked_tokens  # `collate_masks` shadows the name with its parameter
