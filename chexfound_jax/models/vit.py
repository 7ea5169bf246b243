"""The DINOv2-style Vision Transformer of CheXFound (official models/vision_transformer.py), in Flax NNX.

Token order is [cls, registers..., patches]; registers get no position embedding. All
parameters are float32 with logical axis names; activations run in `config.dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from chexfound_jax.models import attention, layers
from chexfound_jax.models.pos_embed import interpolate_pos_embed
from chexfound_jax.parallel import activations

ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}
FFN_LAYERS = ("swiglufused", "mlp")
DROP_PATH_MODES = ("subset", "per_sample")
# What the backward pass keeps of a block's forward (the rest is recomputed): "none" keeps everything;
# "full" keeps only the block input (recomputes the whole forward, about +33% of a step's FLOPs);
# "dots" keeps the outputs of the weight matmuls (qkv, proj, FFN) and recomputes norms, activations
# and attention (a few % of FLOPs); "offload" is "dots" with the saved outputs in host memory.
REMAT_POLICIES = ("none", "full", "dots", "offload")
# Adapter layers (LoRA dropout, models/lora.py) draw from keys folded out of a block's (or the stem's) key with
# this constant, so stochastic depth draws what it draws without them; a plain backbone never uses these keys.
ADAPTER_KEY_STREAM = 0x4C6F5241


def remat_policy_name(remat: bool | str) -> str:
    """The policy name of a config value; True/False are the old "full"/"none"."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {REMAT_POLICIES} (or a bool)")
    return remat


def checkpoint_policy(remat: bool | str) -> Callable[..., bool] | None:
    """The jax.checkpoint policy of a remat setting; None for "full" (save nothing but the input)."""
    name = remat_policy_name(remat)
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return None


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and runtime settings of the backbone. Defaults are CheXFound ViT-L/16 reg4."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 16
    img_size: int = 512  # sizes the stored position embedding (global crop)
    in_chans: int = 3
    ffn_layer: str = "swiglufused"
    mlp_ratio: float = 4.0
    ffn_hidden_dim: int = 0  # 0: derived from mlp_ratio as DINOv2 does
    num_register_tokens: int = 4
    layerscale_init: float | None = 1e-5  # None: no LayerScale
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_eps: float = 1e-6
    interpolate_offset: float = 0.1
    drop_path_rate: float = 0.0
    drop_path_mode: str = "subset"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_impl: str | None = None  # None / "xla" (reference), "cudnn" (GPU) or "splash" (TPU Pallas)
    remat: bool | str = False  # a REMAT_POLICIES name; True / False are "full" / "none"
    scan_layers: bool = True  # blocks as one lax.scan: the step compiles one block instead of `depth`

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer {self.ffn_layer!r} is not one of {FFN_LAYERS}")
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode {self.drop_path_mode!r} is not one of {DROP_PATH_MODES}")
        if not 0.0 <= self.interpolate_offset < 1.0:
            raise ValueError(f"interpolate_offset {self.interpolate_offset} must be in [0, 1)")
        if self.attention_impl not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {attention.IMPLEMENTATIONS}")
        remat_policy_name(self.remat)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def hidden_dim(self) -> int:
        """FFN hidden width: 4096 for a plain ViT-L MLP, 2736 for its fused SwiGLU."""
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglufused":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)


def vit_config(arch: str = "vit_large", **overrides: Any) -> ViTConfig:
    """A named DINOv2 size (vit_small/base/large/giant2) with field overrides."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ViTConfig(**{**ARCHS[arch], **overrides})


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> embed_dim; a Conv2d(stride=p) written as a matmul.

    The kernel is stored as (p, p, C, D), Flax's HWIO conv layout; flattening patches
    row-major (y, x, c) matches it.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_chans, cfg.embed_dim
        fan_in = p * p * c
        self.kernel = layers.param(rngs, layers.torch_linear_uniform(fan_in), (p, p, c, d), (None, None, None, "embed"))
        self.bias = layers.param(rngs, layers.torch_linear_uniform(fan_in), (d,), ("embed",))
        self.patch_size = p
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng` is unused here: an adapted patch embedding (models/lora.py) draws its dropout from it."""
        patches = self.patches(x)
        kernel = self.kernel[...].reshape(patches.shape[-1], -1).astype(self.dtype)
        return jnp.dot(patches, kernel) + self.bias[...].astype(self.dtype)

    def patches(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) images -> (B, h*w, p*p*C) flattened patches in the compute dtype."""
        b, height, width, c = x.shape
        p = self.patch_size
        h, w = height // p, width // p
        x = x[:, : h * p, : w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * w, p * p * c).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection laid out as (3, heads, head_dim)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        dt = cfg.compute_dtype
        self.qkv = layers.Linear(d, 3 * d, axes=("embed", "qkv"), use_bias=cfg.qkv_bias, dtype=dt, rngs=rngs)
        self.proj = layers.Linear(d, d, axes=("heads", "embed"), use_bias=cfg.proj_bias, dtype=dt, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.implementation = cfg.attention_impl

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: keys for adapter dropout in qkv / proj (unused by plain layers)."""
        b, t, d = x.shape
        k_qkv, k_proj = _split(rng)
        qkv = self.qkv(x, rng=k_qkv).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention.dot_product_attention(q, k, v, self.implementation)
        return self.proj(out.reshape(b, t, d), rng=k_proj)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (DINOv2 ViT-S/B/L hub models)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, h, dt = cfg.embed_dim, cfg.hidden_dim, cfg.compute_dtype
        self.fc1 = layers.Linear(d, h, axes=("embed", "mlp"), use_bias=cfg.ffn_bias, dtype=dt, rngs=rngs)
        self.fc2 = layers.Linear(h, d, axes=("mlp", "embed"), use_bias=cfg.ffn_bias, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        k1, k2 = _split(rng)
        return self.fc2(jax.nn.gelu(self.fc1(x, rng=k1), approximate=False), rng=k2)


class SwiGLU(nnx.Module):
    """Fused SwiGLU: w12 gives [gate | value]; SiLU(gate) * value -> w3 (CheXFound, ViT-g)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, h, dt = cfg.embed_dim, cfg.hidden_dim, cfg.compute_dtype
        self.w12 = layers.Linear(d, 2 * h, axes=("embed", "mlp"), use_bias=cfg.ffn_bias, dtype=dt, rngs=rngs)
        self.w3 = layers.Linear(h, d, axes=("mlp", "embed"), use_bias=cfg.ffn_bias, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        k12, k3 = _split(rng)
        gate, value = jnp.split(self.w12(x, rng=k12), 2, axis=-1)
        return self.w3(jax.nn.silu(gate) * value, rng=k3)


def _split(rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    return (None, None) if rng is None else tuple(jax.random.split(rng))


def adapter_key(rng: jax.Array | None) -> jax.Array | None:
    """The adapter-dropout key of a training key (None stays None: deterministic)."""
    return None if rng is None else jax.random.fold_in(rng, ADAPTER_KEY_STREAM)


def drop_path_residual(
    x: jax.Array,
    branch: Callable[[jax.Array], jax.Array],
    rate: float,
    mode: str,
    key: jax.Array,
    groups: int = 1,
) -> jax.Array:
    """x + branch(x) under stochastic depth, in DINOv2's batch-subset form or per sample.

    subset (official layers/block.py, used by DINOv2 when rate > 0.1): in each of the `groups` consecutive row groups
    (an official per-GPU batch) the branch runs on a random subset of int(rows * (1 - rate)) rows
    only, and is added back to those rows scaled by rows / subset. It saves the compute of the
    dropped rows, and keeps every row on the device of its group. per_sample: Bernoulli(1 - rate)
    per sample, / (1 - rate).
    """
    batch = x.shape[0]
    keep_prob = 1.0 - rate
    if mode == "subset" and rate > 0.1:
        if batch % groups:
            raise ValueError(f"{batch} rows do not split into {groups} drop-path groups")
        rows_per_group = batch // groups
        keep = max(int(rows_per_group * keep_prob), 1)
        grouped = activations.constrain_batch(x.reshape(groups, rows_per_group, *x.shape[1:]))
        keys = jax.random.split(key, groups)
        rows = jax.vmap(lambda k: jax.random.permutation(k, rows_per_group)[:keep])(keys)  # (G, keep)
        index = rows.reshape(groups, keep, *([1] * (x.ndim - 1)))
        subset = jnp.take_along_axis(grouped, index, axis=1)
        residual = branch(subset.reshape(groups * keep, *x.shape[1:])) * (rows_per_group / keep)
        residual = residual.astype(x.dtype).reshape(groups, keep, *x.shape[1:])
        out = jax.vmap(lambda g, r, y: g.at[r].add(y))(grouped, rows, residual)
        return activations.constrain_batch(out.reshape(x.shape))
    mask = jax.random.bernoulli(key, keep_prob, (batch,) + (1,) * (x.ndim - 1))
    return x + branch(x) * (mask / keep_prob).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, dt = cfg.embed_dim, cfg.compute_dtype
        self.norm1 = layers.LayerNorm(d, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = layers.LayerNorm(d, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs) if cfg.ffn_layer == "swiglufused" else Mlp(cfg, rngs=rngs)
        if cfg.layerscale_init is None:
            self.ls1 = self.ls2 = None
        else:
            self.ls1 = layers.LayerScale(d, init_value=cfg.layerscale_init, rngs=rngs)
            self.ls2 = layers.LayerScale(d, init_value=cfg.layerscale_init, rngs=rngs)
        self.drop_path_rate = cfg.drop_path_rate
        self.drop_path_mode = cfg.drop_path_mode

    def _attn_branch(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        y = self.attn(self.norm1(x), rng)
        return y if self.ls1 is None else self.ls1(y)

    def _ffn_branch(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        y = self.mlp(self.norm2(x), rng)
        return y if self.ls2 is None else self.ls2(y)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None, groups: int = 1) -> jax.Array:
        """rng given: training with stochastic depth over `groups` row groups (and adapter dropout); None:
        deterministic."""
        x = activations.constrain_batch(x)
        k_attn_adapter, k_ffn_adapter = _split(adapter_key(rng))
        attn_branch = functools.partial(self._attn_branch, rng=k_attn_adapter)
        ffn_branch = functools.partial(self._ffn_branch, rng=k_ffn_adapter)
        if rng is None or self.drop_path_rate == 0.0:
            x = x + attn_branch(x)
            return x + ffn_branch(x)
        k_attn, k_ffn = jax.random.split(rng)
        rate, mode = self.drop_path_rate, self.drop_path_mode
        x = drop_path_residual(x, attn_branch, rate, mode, k_attn, groups)
        return drop_path_residual(x, ffn_branch, rate, mode, k_ffn, groups)


def _block_fn(remat: bool | str, groups: int) -> Callable:
    """(graphdef, block state, x, key) -> x, checkpointed by the remat policy."""

    def apply(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return nnx.merge(graphdef, state)(x, key, groups)

    if remat_policy_name(remat) == "none":
        return apply
    return jax.checkpoint(apply, policy=checkpoint_policy(remat), static_argnums=(0,))


class VisionTransformer(nnx.Module):
    """DinoVisionTransformer: patch embed, cls + register tokens, pre-norm blocks, final norm."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        tiny_normal = nnx.initializers.normal(1e-6)
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = layers.param(rngs, tiny_normal, (1, 1, d), (None, None, "embed"))
        self.register_tokens = (
            layers.param(rngs, tiny_normal, (1, cfg.num_register_tokens, d), (None, None, "embed"))
            if cfg.num_register_tokens
            else None
        )
        self.mask_token = layers.param(rngs, nnx.initializers.zeros, (1, d), (None, "embed"))
        num_pos = 1 + cfg.grid_size**2
        self.pos_embed = layers.param(rngs, layers.trunc_normal_02, (1, num_pos, d), (None, None, "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = layers.LayerNorm(d, eps=cfg.norm_eps, dtype=cfg.compute_dtype, rngs=rngs)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def prepare_tokens(self, x: jax.Array, masks: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """NHWC images (and optional (B, N) bool iBOT masks) -> [cls, regs, patches] tokens. `rng`: the
        training key, for an adapted patch embedding's dropout."""
        cfg = self.config
        dt = cfg.compute_dtype
        b, height, width, _ = x.shape
        tokens = self.patch_embed(x, adapter_key(rng))
        if masks is not None:
            tokens = jnp.where(masks[..., None], self.mask_token[...].astype(dt)[None], tokens)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, cfg.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        pos = interpolate_pos_embed(self.pos_embed[...], height, width, cfg.patch_size, cfg.interpolate_offset)
        tokens = tokens + pos.astype(dt)
        if self.register_tokens is not None:
            regs = jnp.broadcast_to(self.register_tokens[...].astype(dt), (b, cfg.num_register_tokens, cfg.embed_dim))
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)
        return tokens

    def run_blocks(
        self,
        x: jax.Array,
        rng: jax.Array | None = None,
        collect: tuple[int, ...] = (),
        groups: int = 1,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Runs every block; returns the last output and the outputs of blocks in `collect`.

        With `scan_layers` the blocks before the first collected one run as one lax.scan over their
        stacked parameters (stacked here, so the stored layout stays one subtree per block); the
        others, and all of them without `scan_layers`, run one by one.
        """
        depth = len(self.blocks)
        keys = [None] * depth if rng is None else list(jax.random.split(rng, depth))
        apply = _block_fn(self.config.remat, groups)
        graphdef = nnx.graphdef(self.blocks[0])
        states = [nnx.state(block) for block in self.blocks]
        start = 0
        if self.config.scan_layers:
            start = min(collect, default=depth)
            if start > 1:
                x = _scan_blocks(apply, graphdef, states[:start], x, keys[:start])
            else:
                start = 0
        collected = []
        for i in range(start, depth):
            x = apply(graphdef, states[i], x, keys[i])
            if i in collect:
                collected.append(x)
        return x, collected

    def _split_tokens(self, x_norm: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        r = self.num_prefix_tokens
        return x_norm[:, 0], x_norm[:, 1:r], x_norm[:, r:]

    def forward_features(
        self, x: jax.Array, masks: jax.Array | None = None, *, rng: jax.Array | None = None, groups: int = 1
    ) -> dict[str, jax.Array]:
        """The dict of DINOv2's forward_features. `rng` enables stochastic depth (training) over
        `groups` consecutive row groups (official per-GPU batches)."""
        x_prenorm, _ = self.run_blocks(self.prepare_tokens(x, masks, rng), rng, groups=groups)
        cls, regs, patches = self._split_tokens(self.norm(x_prenorm))
        out = {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": regs,
            "x_norm_patchtokens": patches,
            "x_prenorm": x_prenorm,
        }
        if masks is not None:
            out["masks"] = masks
        return out

    def last_blocks(
        self, x: jax.Array, n: int = 4, *, norm: bool = True, rng: jax.Array | None = None
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
        """(cls, registers, patches) of the last n blocks, shallow to deep, in one forward pass.

        With norm=True each passes through the shared final LayerNorm, so the deepest entry is
        forward_features' x_norm_* outputs. `rng` makes it a training forward (adapter dropout, and
        stochastic depth if the config has a drop-path rate); None is deterministic.
        """
        depth = len(self.blocks)
        if not 0 < n <= depth:
            raise ValueError(f"n={n} must be in [1, {depth}]")
        tokens = self.prepare_tokens(x, rng=rng)
        _, outs = self.run_blocks(tokens, rng, collect=tuple(range(depth - n, depth)))
        return tuple(self._split_tokens(self.norm(out) if norm else out) for out in outs)

    def get_intermediate_layers(
        self, x: jax.Array, n: int = 4, *, norm: bool = True, rng: jax.Array | None = None
    ) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """DINOv2's (patch_tokens, cls_token) of the last n blocks, registers dropped.

        This is what every CheXFound downstream head reads (n = 4, norm = True).
        """
        return tuple((patches, cls) for cls, _, patches in self.last_blocks(x, n, norm=norm, rng=rng))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The normalised class token, what DINOv2's forward returns at inference."""
        return self.forward_features(x)["x_norm_clstoken"]


def _scan_blocks(
    apply: Callable, graphdef: nnx.GraphDef, states: list[nnx.State], x: jax.Array, keys: list[jax.Array | None]
) -> jax.Array:
    """x through the blocks of `states` as one scan; the per-block keys ride along as scanned inputs."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    xs = (stacked, None if keys[0] is None else jnp.stack(keys))

    def body(carry: jax.Array, inputs: tuple) -> tuple[jax.Array, None]:
        state, key = inputs
        return apply(graphdef, state, carry, key), None

    x, _ = jax.lax.scan(body, x, xs)
    return x


@functools.lru_cache(maxsize=16)
def abstract_vit_params(cfg: ViTConfig) -> dict:
    """Shapes/dtypes of the backbone parameters as a pure dict, without allocating them."""
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param).to_pure_dict()


def count_params(params: Any) -> int:
    return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(params))
