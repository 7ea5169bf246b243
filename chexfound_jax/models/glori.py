"""GLoRI, CheXFound's classification head (official eval/classification/glori.py): an ML-Decoder on frozen features.

Patch features of the last blocks are projected to the decoder width (the memory); K frozen
random queries, one per class, attend to it through one post-LN decoder layer without
self-attention; a per-class linear map ("group FC") turns each query's output into a logit.

Reproduced literally, quirks included (official eval/classification/glori.py): the first step is
LN1(q + dropout(q)), i.e. LN1(2q) in eval; the queries are N(0, 1) and never trained, but saved;
with `cat_cls` the CLS concat comes before the query output. Everything runs in float32.

Logical axes: "embed" the backbone feature axis (F = n_blocks * D), "head_mlp" the decoder width,
"mlp" the FFN width, "qkv" the fused attention projection, "heads" the concatenated head outputs,
"norm" LayerNorm parameters; class axes are unnamed (replicated).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from chexfound_jax.models import layers

if TYPE_CHECKING:
    from chexfound_jax.models.classifiers import ClassifierConfig


class FrozenQuery(nnx.Variable):
    """A saved but untrained variable: optimizers that take nnx.Param skip it."""


def torch_linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs):
    """nn.Linear with PyTorch's default init: U(+-1/sqrt(fan_in)) for the weight and the bias."""
    linear = layers.Linear(
        in_features, out_features, axes=axes, kernel_init=layers.torch_linear_uniform(in_features), rngs=rngs
    )
    linear.bias = layers.param(rngs, layers.torch_linear_uniform(in_features), (out_features,), axes[1:])
    return linear


def dropout_masks(key: jax.Array | None, rate: float, shapes: list[tuple[int, ...]]) -> list[jax.Array | None]:
    """Keep masks (probability 1 - rate) for several dropout sites; all None in eval (key None) or at rate 0.

    One uniform draw is split between the sites: a single RNG kernel compiles several times faster
    than one per site, and the masks are as independent.
    """
    if key is None or rate == 0.0:
        return [None] * len(shapes)
    sizes = [math.prod(shape) for shape in shapes]
    u = jax.random.uniform(key, (sum(sizes),))
    parts = jnp.split(u, list(itertools.accumulate(sizes))[:-1])
    return [part.reshape(shape) >= rate for part, shape in zip(parts, shapes)]


def dropout(x: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout as torch.nn.Dropout: kept values scaled by 1 / (1 - rate); identity without a mask."""
    if keep is None:
        return x
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def feature(features: dict[str, jax.Array], name: str, dim: int, ndim: int) -> jax.Array:
    """features[name] as float32, checked to be ndim-D with a last axis of dim (official heads run in fp32)."""
    if name not in features:
        raise ValueError(f"head input {name!r} is missing; got {sorted(features)}")
    x = jnp.asarray(features[name])
    if x.ndim != ndim or x.shape[-1] != dim:
        raise ValueError(f"head input {name!r} has shape {x.shape}, expected {ndim} dims ending in {dim}")
    return x.astype(jnp.float32)


def xavier_normal_group_fc(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """torch.nn.init.xavier_normal_ on the (K, F', 1) tensor: fan_in F', fan_out K."""
    k, f = shape
    return jax.random.normal(key, shape, dtype) * (2.0 / (f + k)) ** 0.5


class CrossAttention(nnx.Module):
    """torch.nn.MultiheadAttention(query=t, key=value=memory) with per-head weights returned.

    in_proj holds [Wq | Wk | Wv] as one (d, 3d) kernel (Xavier-uniform, zero bias), like torch's
    in_proj_weight (3d, d) transposed; out_proj has torch's default weight init and a zero bias.
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"decoder_dim {dim} is not divisible by num_heads {num_heads}")
        self.in_proj = layers.Linear(
            dim, 3 * dim, axes=("head_mlp", "qkv"), kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs
        )
        self.out_proj = layers.Linear(
            dim, dim, axes=("heads", "head_mlp"), kernel_init=layers.torch_linear_uniform(dim), rngs=rngs
        )
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout

    def __call__(
        self, query: jax.Array, memory: jax.Array, keep: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """query (B, K, d), memory (B, N, d) -> (output (B, K, d), weights (B, heads, K, N)).

        keep: the dropout mask of the weights (training), None in eval.
        """
        b, k, d = query.shape
        h = self.num_heads
        w, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
        q = query @ w[:, :d] + bias[:d]
        key = memory @ w[:, d : 2 * d] + bias[d : 2 * d]
        value = memory @ w[:, 2 * d :] + bias[2 * d :]
        q = q.reshape(b, k, h, d // h) * (d // h) ** -0.5  # torch scales q before the product
        key = key.reshape(b, -1, h, d // h)
        value = value.reshape(b, -1, h, d // h)
        weights = jax.nn.softmax(jnp.einsum("bkhe,bnhe->bhkn", q, key), axis=-1)
        weights = dropout(weights, keep, self.attn_dropout)  # torch returns the dropped weights too
        out = jnp.einsum("bhkn,bnhe->bkhe", weights, value).reshape(b, k, d)
        return self.out_proj(out), weights


class GLoRI(nnx.Module):
    """The GLoRI head; inputs are head_inputs' {"patch": (B, N, F), "cls": (B, F)}."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        f, d, k = cfg.feature_dim, cfg.decoder_dim, cfg.num_classes
        self.embed_standart = torch_linear(f, d, ("embed", "head_mlp"), rngs)
        self.query_embed = FrozenQuery(
            jax.random.normal(rngs.params(), (k, d), jnp.float32), logical_axes=(None, "head_mlp")
        )
        self.norm1 = layers.LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.multihead_attn = CrossAttention(d, cfg.num_heads, cfg.dropout, rngs=rngs)
        self.linear1 = torch_linear(d, cfg.ffn_dim, ("head_mlp", "mlp"), rngs)
        self.linear2 = torch_linear(cfg.ffn_dim, d, ("mlp", "head_mlp"), rngs)
        self.norm2 = layers.LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.norm3 = layers.LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.duplicate_pooling = layers.param(rngs, xavier_normal_group_fc, (k, cfg.pooled_dim), (None, None))
        self.duplicate_pooling_bias = layers.param(rngs, nnx.initializers.zeros, (k,), (None,))
        self.feature_dim = f
        self.cat_cls = cfg.cat_cls
        self.rate = cfg.dropout

    def __call__(
        self, features: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits (B, K), plus the cross-attention (B, heads, K, N) if asked. dropout_rng None: eval."""
        patch = feature(features, "patch", self.feature_dim, ndim=3)
        b, n, _ = patch.shape
        query = self.query_embed[...]
        (k, d), heads, ffn_dim = query.shape, self.multihead_attn.num_heads, self.linear1.kernel.shape[1]
        # sites: the query "residual", attention weights, attention output, FFN hidden, FFN output
        shapes = [(b, k, d), (b, heads, k, n), (b, k, d), (b, k, ffn_dim), (b, k, d)]
        keep = dropout_masks(dropout_rng, self.rate, shapes)
        memory = jax.nn.relu(self.embed_standart(patch))
        q = jnp.broadcast_to(query, (b, k, d))  # one dropout mask per image, as torch's expand
        t = self.norm1(q + dropout(q, keep[0], self.rate))
        a, attention = self.multihead_attn(t, memory, keep[1])
        t = self.norm2(t + dropout(a, keep[2], self.rate))
        ffn = self.linear2(dropout(jax.nn.relu(self.linear1(t)), keep[3], self.rate))
        t = self.norm3(t + dropout(ffn, keep[4], self.rate))
        if self.cat_cls:
            cls = feature(features, "cls", self.feature_dim, ndim=2)
            t = jnp.concatenate([jnp.broadcast_to(cls[:, None], (b, t.shape[1], cls.shape[-1])), t], axis=-1)
        logits = jnp.einsum("bkf,kf->bk", t, self.duplicate_pooling[...]) + self.duplicate_pooling_bias[...]
        return (logits, attention) if return_attention else logits
