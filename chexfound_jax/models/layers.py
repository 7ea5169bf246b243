"""Minimal Flax NNX layers whose parameters carry logical axis names.

Every parameter is an `nnx.Param` with a `logical_axes` metadata tuple; the sharding
rules in `chexfound_jax.parallel` map those names onto mesh axes. Parameters are stored
in float32 and cast to the compute dtype at use, which keeps the optimiser exact while
the matmuls run in bf16 on accelerators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def trunc_normal_02(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """PyTorch's trunc_normal_(std=0.02): cut at +-2 absolute, i.e. +-100 sigma (no variance fix-up)."""
    return 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, dtype)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter annotated with one logical axis name per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(axes))


def torch_linear_uniform(fan_in: int) -> Initializer:
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """y = x @ kernel + bias with a (in, out) kernel, as a transposed torch nn.Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        kernel_init: Initializer = trunc_normal_02,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng` is unused here: adapter subclasses (models/lora.py) draw their dropout from it."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32 and the two-pass variance of torch.nn.LayerNorm."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class LayerScale(nnx.Module):
    """Per-channel residual scale `gamma` (CaiT), initialised to a small constant."""

    def __init__(self, dim: int, *, init_value: float, rngs: nnx.Rngs):
        self.gamma = param(rngs, nnx.initializers.constant(init_value), (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)
