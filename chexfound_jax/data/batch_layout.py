"""The layout of a pretraining batch, shared by the input pipeline and the train step.

Images come in G groups (config `train.batch_groups`), each the size of an official
per-GPU batch b = global_batch / G, with that code's per-GPU ordering inside:

  global_crops  (G, 2b, S, S, 3)       [crop-1 of the b images; crop-2 of the b images]
  local_crops   (G, n_local*b, s, s, 3) [local crop 1 of the b images; ...]
  masks         (G, 2b, N) bool        iBOT masks of the global crops
  mask_indices  (G, M) int32           flat indices into (2b*N) of the masked tokens, padded
  mask_weights  (G, M) float32         1 / (masked tokens of that image); 0 for padding
  mask_valid    (G, M) bool

The group axis is sharded over the batch mesh axes, so per-group work (iBOT gathers, KoLeo
neighbours) stays on its device, and the numbers do not depend on the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from chexfound_jax.ssl import masking

BATCH_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "mask_valid")


def batch_groups(cfg: Any, num_batch_shards: int) -> int:
    groups = cfg.train.batch_groups
    groups = num_batch_shards if groups == -1 else groups
    if cfg.train.global_batch_size % groups:
        raise ValueError(f"train.global_batch_size {cfg.train.global_batch_size} is not divisible into {groups} groups")
    return groups


def max_masked_tokens(cfg: Any, group_size: int) -> int:
    n = (cfg.crops.global_crops_size // cfg.model.patch_size) ** 2
    ratio = tuple(cfg.ibot.mask_ratio_min_max)
    return masking.max_masked_tokens(2 * group_size, n, ratio, cfg.ibot.mask_sample_probability)


def batch_spec(cfg: Any, groups: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch (see the module docstring)."""
    b = cfg.train.global_batch_size // groups
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n = (g // cfg.model.patch_size) ** 2
    m = max_masked_tokens(cfg, b)
    return {
        "global_crops": jax.ShapeDtypeStruct((groups, 2 * b, g, g, 3), jnp.float32),
        "local_crops": jax.ShapeDtypeStruct((groups, cfg.crops.local_crops_number * b, s, s, 3), jnp.float32),
        "masks": jax.ShapeDtypeStruct((groups, 2 * b, n), jnp.bool_),
        "mask_indices": jax.ShapeDtypeStruct((groups, m), jnp.int32),
        "mask_weights": jax.ShapeDtypeStruct((groups, m), jnp.float32),
        "mask_valid": jax.ShapeDtypeStruct((groups, m), jnp.bool_),
    }


def batch_logical_axes(spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, PartitionSpec]:
    """Only the group axis is sharded (over the `batch` rule)."""
    return {k: PartitionSpec("batch", *([None] * (len(v.shape) - 1))) for k, v in spec.items()}
