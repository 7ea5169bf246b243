"""Splash attention (Pallas interpret mode on CPU) against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from chexfound_jax.models.attention import dot_product_attention
from chexfound_jax.parallel import activations, mesh, sharding


def _qkv(b: int, t: int, heads: int = 2, head_dim: int = 64) -> tuple[jax.Array, ...]:
    return tuple(
        jax.random.normal(key, (b, t, heads, head_dim), jnp.float32) for key in jax.random.split(jax.random.key(t), 3)
    )


def _value_and_grads(implementation: str, block_size: int, q: jax.Array, k: jax.Array, v: jax.Array):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, implementation, block_size=block_size)
        return jnp.sum(out * jnp.cos(out)), out  # a non-linear cotangent

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# T not a multiple of the kernel block: one padded block (21 -> 128, 86 -> 128) and two (130 -> 256).
@pytest.mark.parametrize(("t", "block_size"), [(21, 512), (86, 512), (130, 128)])
def test_splash_matches_xla_forward_and_grads(t: int, block_size: int) -> None:
    q, k, v = _qkv(2, t)
    ref_out, ref_grads = _value_and_grads("xla", block_size, q, k, v)
    out, grads = _value_and_grads("splash", block_size, q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_splash_under_batch_sharded_mesh_has_no_all_gather() -> None:
    data_mesh = mesh.create_mesh({"data": 8})
    batch = NamedSharding(data_mesh, PartitionSpec("data"))
    q, k, v = (jax.device_put(x, batch) for x in _qkv(8, 21))
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "splash"), out_shardings=batch)
    with activations.activation_sharding(data_mesh, sharding.DATA_PARALLEL_RULES):
        compiled = fn.lower(q, k, v).compile()
    assert "all-gather" not in compiled.as_text()
    out = compiled(q, k, v)
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_named() -> None:
    q, k, v = _qkv(1, 4)
    with pytest.raises(ValueError, match="'flash'"):
        dot_product_attention(q, k, v, "flash")
