"""Stacks per-group multi-crop images and their iBOT masks into one global batch (data/batch_layout.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from chexfound_jax.data import batch_layout
from chexfound_jax.ssl import masking


def collate(global_crops: np.ndarray, local_crops: np.ndarray, rng: np.random.Generator, cfg: Any) -> dict:
    """(G, 2b, S, S, 3) and (G, n_local*b, s, s, 3) crops -> the batch dict, masks drawn per group."""
    groups, two_b = global_crops.shape[:2]
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    limit = batch_layout.max_masked_tokens(cfg, two_b // 2)
    per_group = [
        masking.collate_masks(
            rng,
            two_b,
            (grid, grid),
            mask_ratio=tuple(cfg.ibot.mask_ratio_min_max),
            mask_probability=cfg.ibot.mask_sample_probability,
            max_masked_tokens=limit,
            max_num_patches=masking.official_max_num_patches(cfg.crops.global_crops_size, cfg.model.patch_size),
        )
        for _ in range(groups)
    ]
    batch = {k: np.stack([m[k] for m in per_group]) for k in ("masks", "mask_indices", "mask_weights", "mask_valid")}
    batch["global_crops"] = np.asarray(global_crops, np.float32)
    batch["local_crops"] = np.asarray(local_crops, np.float32)
    return batch


def synthetic_batch(cfg: Any, spec: dict, rng: np.random.Generator) -> dict:
    """Random-normal crops with real iBOT masks, shaped like one global batch (benchmarks, tests)."""
    return collate(
        rng.standard_normal(spec["global_crops"].shape, np.float32),
        rng.standard_normal(spec["local_crops"].shape, np.float32),
        rng,
        cfg,
    )
