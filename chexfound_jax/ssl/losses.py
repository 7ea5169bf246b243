"""DINO, iBOT and KoLeo losses and their teacher targets (official loss/dino_clstoken_loss.py, ibot_patch_loss.py,
koleo_loss.py, combined in train/ssl_meta_arch.py).

The functions are written for the GLOBAL batch. Under `jit` over sharded jax.Arrays, a `jnp.sum`
over the batch axis is the all-reduce that the official code does with torch.distributed, so no
collectives appear here. Shapes are static: iBOT's variable number of masked tokens comes as a
padded buffer with a weight/validity vector (weight 0 = padding). Everything is computed in float32,
as the official code does (fp32 head logits, autocast off for KoLeo). The functions are jitted so
eager callers compile each once; inside the train step's jit they are simply inlined.

The training step composes the total loss (weights of the CheXFound config):

    total = dino_local_crops_loss + dino_global_crops_loss        # dino.loss_weight 1.0
          + 0.1 * (koleo(crop 1) + koleo(crop 2))                 # dino.koleo_loss_weight 0.1
          + 3.0 * ibot                                            # ibot.loss_weight 3.0

where `ibot` already includes loss_scales 2 x ibot_loss_scale 1/2 = 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ArrayLike = jax.typing.ArrayLike


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _log_softmax(logits: ArrayLike, temp: float) -> jax.Array:
    return jax.nn.log_softmax(_f32(logits) / temp, axis=-1)


@functools.partial(jax.jit, static_argnames="n_iterations")
def sinkhorn_knopp(
    teacher_logits: ArrayLike,
    teacher_temp: ArrayLike,
    n_iterations: int = 3,
    valid: ArrayLike | None = None,
) -> jax.Array:
    """(n, K) teacher targets by the official Sinkhorn-Knopp: each valid row sums to 1.

    Follows DINOLoss/iBOTPatchLoss.sinkhorn_knopp_teacher step by step (no max subtraction, like the
    official) in the (n, K) layout, i.e. on Qᵀ: the official "row" step is a per-prototype sum over
    the global batch, the "column" step a per-sample sum. B is the number of valid rows: n for DINO,
    the count of real masked tokens for iBOT. Padding rows (`valid` False) enter no sum and come out
    as exact zeros, so the result on the valid rows does not depend on the buffer size.
    """
    t = _f32(teacher_logits)
    n, k = t.shape
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = jnp.asarray(valid, bool)[:, None]
    n_valid = jnp.sum(valid).astype(jnp.float32)

    q = jnp.where(valid, jnp.exp(jnp.where(valid, t, 0.0) / teacher_temp), 0.0)
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.sum(q, axis=0, keepdims=True)  # per prototype (official rows, all-reduced)
        q = q / k
        q = q / jnp.where(valid, jnp.sum(q, axis=1, keepdims=True), 1.0)  # per sample; padding stays 0
        q = q / n_valid
    return jnp.where(valid, q * n_valid, 0.0)


@jax.jit
def softmax_center_teacher(teacher_logits: ArrayLike, center: ArrayLike, teacher_temp: ArrayLike) -> jax.Array:
    """softmax((T - c) / τ_t): the `centering: centering` alternative to Sinkhorn (unused by CheXFound)."""
    return jax.nn.softmax((_f32(teacher_logits) - _f32(center)) / teacher_temp, axis=-1)


@jax.jit
def update_center(
    center: ArrayLike, teacher_logits: ArrayLike, momentum: float = 0.9, valid: ArrayLike | None = None
) -> jax.Array:
    """EMA of the batch mean of the teacher logits, returned in `center`'s shape.

    The official update is asynchronous: the targets of step t use the center from before step t's
    update, so call this after `softmax_center_teacher`. For iBOT pass `valid` so the mean runs over
    the real masked tokens only.
    """
    center = _f32(center)
    t = _f32(teacher_logits)
    t = t.reshape(-1, t.shape[-1])
    if valid is None:
        batch_center = jnp.mean(t, axis=0)
    else:
        v = jnp.asarray(valid, bool).reshape(-1, 1)
        batch_center = jnp.sum(jnp.where(v, t, 0.0), axis=0) / jnp.maximum(jnp.sum(v), 1).astype(jnp.float32)
    return center * momentum + batch_center.reshape(center.shape) * (1.0 - momentum)


@jax.jit
def dino_loss(
    student_local: ArrayLike,
    student_global: ArrayLike,
    teacher_targets: ArrayLike,
    student_temp: float = 0.1,
) -> dict[str, jax.Array]:
    """The DINO term as ssl_meta_arch composes it: the mean over all (student view, other teacher view) pairs.

    student_local (n_local, b, K); student_global (2, b, K); teacher_targets (2, b, K) are the targets
    of the SWAPPED teacher [p(t2); p(t1)], so student crop i is compared with the other crop's teacher.
    Both terms are divided by n_terms = 2·1 + 2·n_local (18 with 8 local crops).
    """
    q = _f32(teacher_targets)
    n_global, b, _ = q.shape
    if n_global != 2 or jnp.shape(student_global)[0] != 2:
        raise ValueError(f"DINOv2's loss composition needs 2 global crops, got {n_global}")
    n_local = jnp.shape(student_local)[0]
    n_terms = n_global * (n_global - 1) + n_global * n_local
    # Every local crop against both teacher crops: summing the teacher crops first is the same sum.
    local = -jnp.sum(jnp.sum(q, axis=0) * _log_softmax(student_local, student_temp)) / (b * n_terms)
    # One batch mean over the 2b global rows, times loss_scales 2.
    global_ = -jnp.sum(q * _log_softmax(student_global, student_temp)) / (n_global * b) * 2.0 / n_terms
    return {"dino_local_crops_loss": local, "dino_global_crops_loss": global_}


@jax.jit
def ibot_loss(
    student_logits: ArrayLike,
    teacher_targets: ArrayLike,
    weights: ArrayLike,
    n_global_images: ArrayLike,
    student_temp: float = 0.1,
) -> jax.Array:
    """iBOT patch loss: (1 / n_global_images) Σ_j w_j CE(q_j, s_j) over a padded buffer of masked tokens.

    student_logits, teacher_targets (M, K) at the masked tokens; weights (M,) = 1 / (masked count of
    the token's image), 0 for padding (padding logits must be finite). The divisor counts ALL 2b
    global images, masked or not, as iBOTPatchLoss.forward_masked does; the official loss_scales 2 x
    ibot_loss_scale 1/2 = 1 leave the value unchanged.
    """
    ce = -jnp.sum(_f32(teacher_targets) * _log_softmax(student_logits, student_temp), axis=-1)
    return jnp.sum(_f32(weights) * ce) / _f32(n_global_images)


@functools.partial(jax.jit, static_argnames="group_size")
def koleo_loss(x: ArrayLike, group_size: int | None = None, eps: float = 1e-8) -> jax.Array:
    """KoLeo entropy estimator -mean log(nearest-neighbour distance) on L2-normalised rows.

    The official computes it on each GPU's b vectors of one crop; `group_size` splits the n rows into
    n // group_size consecutive groups (one per official device batch), computed independently and
    averaged, so the value does not depend on how the global batch is sharded. None = one group.
    """
    x = _f32(x)
    n, d = x.shape
    g = n if group_size is None else group_size
    if g < 2 or n % g:
        raise ValueError(f"group_size {g} must be >= 2 and divide the {n} rows")
    x = x.reshape(n // g, g, d)
    # True division like F.normalize: XLA rewrites x / broadcast(norm) as x * (1 / norm), an ulp off, so
    # identical directions would no longer normalise to identical vectors and the 1e-8 eps regime breaks.
    norm = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    x = x / jax.lax.optimization_barrier(jnp.broadcast_to(norm, x.shape))
    dots = jnp.einsum("gid,gjd->gij", x, x, precision=jax.lax.Precision.HIGHEST)
    dots = jnp.where(jnp.eye(g, dtype=bool), -1.0, dots)  # the official fills the diagonal with -1
    nn = jnp.argmax(dots, axis=-1)
    x_nn = jnp.take_along_axis(x, nn[..., None], axis=1)
    dist = jnp.linalg.norm(x - x_nn + eps, axis=-1)  # torch.nn.PairwiseDistance adds eps to the difference
    return -jnp.mean(jnp.log(dist + eps))
