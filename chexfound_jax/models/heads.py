"""DINO / iBOT projection heads (official layers/dino_head.py, `DINOHead`).

MLP (Linear-GELU x (nlayers-1), Linear to the bottleneck) -> L2 normalisation -> a
weight-normalised prototype layer without bias, W = g * v / ||v|| per prototype. CheXFound uses
separate heads: DINO bottleneck 384, iBOT bottleneck 256, 131072 prototypes each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from chexfound_jax.models import layers


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    in_dim: int = 1024
    out_dim: int = 131072  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 384
    nlayers: int = 3
    dtype: str = "float32"

    def __post_init__(self):
        if self.nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {self.nlayers}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        return cls(**d)


class WeightNormLinear(nnx.Module):
    """Bias-free linear layer with weight normalisation: W[:, k] = g[k] * v[:, k] / ||v[:, k]||."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.v = layers.param(
            rngs, layers.torch_linear_uniform(in_dim), (in_dim, out_dim), ("bottleneck", "prototypes")
        )
        self.g = layers.param(rngs, nnx.initializers.ones, (out_dim,), ("prototypes",))

    def weight(self) -> jax.Array:
        """The effective (in, out) float32 matrix g * v / ||v||."""
        v = self.v[...].astype(jnp.float32)
        return v * (self.g[...] / jnp.linalg.norm(v, axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(jnp.float32), self.weight())


class DINOHead(nnx.Module):
    """The projection head; logits are computed in float32 (the losses need fp32 softmax)."""

    def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
        dims = [cfg.in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
        axes = [("embed", "head_mlp")] + [("head_mlp", "head_mlp")] * (cfg.nlayers - 2) + [("head_mlp", "bottleneck")]
        if cfg.nlayers == 1:
            axes = [("embed", "bottleneck")]
        dt = jnp.dtype(cfg.dtype)
        self.mlp = nnx.List(
            [layers.Linear(i, o, axes=a, dtype=dt, rngs=rngs) for i, o, a in zip(dims[:-1], dims[1:], axes)]
        )
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, rngs=rngs)

    def bottleneck(self, x: jax.Array) -> jax.Array:
        """The L2-normalised float32 bottleneck features the prototype layer reads."""
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.last_layer(self.bottleneck(x))


def abstract_head_params(cfg: HeadConfig) -> dict:
    model = nnx.eval_shape(lambda: DINOHead(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param).to_pure_dict()
