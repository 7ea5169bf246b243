"""Multi-head self-attention by implementation name, with a TPU kernel that never materialises T x T scores.

`jax.nn.dot_product_attention` ("xla", or "cudnn" on GPU) is the reference. On TPU, XLA builds the
full (B, H, T, T) score tensor, which at 512 px (T = 1029 tokens) dominates activation memory;
"splash" runs the Pallas splash-attention kernel instead, an online-softmax over (block_q, block_kv)
tiles with its own backward kernels (custom VJP). The kernel needs T to be a multiple of its block,
so tokens are zero-padded and the padded KEY columns masked by a static mask (padded query rows see
the real keys and are sliced off). Off TPU the kernel runs in Pallas interpret mode, which keeps it
testable on CPU. A pallas_call is opaque to GSPMD, which would all-gather its operands onto every
device, so under a sharded activation context it runs inside `jax.shard_map` over the batch axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from chexfound_jax.parallel import activations

IMPLEMENTATIONS = (None, "xla", "cudnn", "splash", "auto")
LANES = 128  # splash block sizes must be multiples of the TPU lane width


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    implementation: str | None = None,
    *,
    block_size: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over all T tokens; q, k, v and the result are (B, T, H, Dh).

    `implementation`: None / "xla" and "cudnn" are `jax.nn.dot_product_attention`'s; "splash" is the
    Pallas TPU kernel with tiles of min(block_size, T rounded up to 128) tokens. `interpret` (splash
    only): run the kernel in Pallas interpret mode; None means unless the target platform is TPU.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    ctx = activations.current()
    platform = ctx.platform if ctx is not None else jax.default_backend()
    implementation = resolve(implementation, platform, q.dtype, q.shape[1])
    if implementation != "splash":
        return jax.nn.dot_product_attention(q, k, v, implementation=None if implementation == "xla" else implementation)
    if interpret is None:
        interpret = platform != "tpu"
    attend = functools.partial(_splash, block_size=block_size, interpret=interpret)
    if ctx is not None and ctx.batch_axes():
        spec = PartitionSpec(ctx.batch_axes())
        attend = jax.shard_map(attend, mesh=ctx.mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return attend(q, k, v)


def resolve(implementation: str | None, platform: str, dtype: jnp.dtype, tokens: int) -> str | None:
    """The implementation that runs: "auto" chosen for the platform, dtype and sequence length."""
    return auto_implementation(platform, dtype, tokens) if implementation == "auto" else implementation


def auto_implementation(platform: str, dtype: jnp.dtype, tokens: int) -> str:
    """ "auto": splash on TPU for long sequences (at 144 px, 86 tokens, XLA's scores are small and padding
    to 128 costs more than it saves), cuDNN flash attention on GPU in half precision (its only dtypes),
    else XLA."""
    if platform == "tpu":
        return "splash" if tokens > 256 else "xla"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, interpret: bool) -> jax.Array:
    _, t, heads, head_dim = q.shape
    padded, block = _padding(t, block_size)

    def to_kernel(x: jax.Array) -> jax.Array:  # (B, T, H, Dh) -> (B, H, T_padded, Dh)
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    kernel = _kernel(heads, t, padded, block, interpret)
    out = jax.vmap(kernel)(to_kernel(q * jnp.asarray(head_dim**-0.5, q.dtype)), to_kernel(k), to_kernel(v))
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _padding(t: int, block_size: int) -> tuple[int, int]:
    """(padded length, block): T up to a multiple of 128, and the largest block <= block_size dividing it.

    At 512 px T = 1029 pads to 1152 in blocks of 384, not to 1536 in blocks of 512 (2.2x the work).
    """
    padded = -(-t // LANES) * LANES
    block = max(b for b in range(LANES, max(block_size, LANES) + 1, LANES) if padded % b == 0)
    return padded, block


def _kernel(heads: int, t: int, padded: int, block: int, interpret: bool) -> splash.SplashAttentionKernel:
    """Splash MHA over `padded` tokens of which the first `t` are real keys (same mask for every head)."""
    keys = np.broadcast_to(np.arange(padded) < t, (padded, padded))
    mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(np.ascontiguousarray(keys))] * heads)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block, block_q_dq=block, block_kv_dq=block
    )
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
