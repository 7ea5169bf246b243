"""iBOT teacher targets and patch loss in row chunks of the masked-token buffer.

Why: at 64 images per chip the iBOT buffer holds G_local·M = 8·2659 masked tokens per chip and the
head has K = 131072 prototypes, so ONE (rows, K) float32 logit array is ~11 GB, and the whole
computation (`losses.sinkhorn_knopp` + `losses.ibot_loss` on head logits) keeps several: teacher
logits, Sinkhorn intermediates, student logits, log-softmax and their gradients. Here the logits are
never materialised for the whole buffer: they are recomputed chunk by chunk from the heads' L2-normalised
bottleneck features z (G, M, Db) and effective prototype matrices W (Db, K), logits = z @ W.

Layout: chunks of C rows run along M, G stays the leading axis of every chunk ((G, C, K)), so with G
sharded over devices each device only holds (G_local, C, K). Per-prototype sums over rows are kept as
(G, K) partial sums and reduced over G once per pass: the official K-vector all-reduce. Peak memory
is a few (G_local, C, K) float32 buffers (about 4 in XLA:CPU's value_and_grad), independent of M. The
gradient of W is accumulated over chunks; XLA's while-loop-all-reduce-code-motion (GPU/TPU pipelines,
not CPU) moves its data-parallel all-reduce out of the backward scan.

Sinkhorn-Knopp in scaled form: q_ij = E_ij · a_i · b_j with E = exp(t / τ) on valid rows (0 on
padding, no max subtraction, like the official), a row scale a (G, M) and a prototype scale b (K,).
Step for step as `losses.sinkhorn_knopp`, with these exact cancellations of the scaled form:
  * the initial q / Σq is skipped: the first per-prototype normalisation divides it out;
  * per prototype: colsum_j = b_j · Σ_i E_ij a_i (valid rows), b ← b / colsum / K;
  * per sample: rowsum_i = a_i · Σ_j E_ij b_j, a ← a / rowsum / n_valid = 1 / (Σ_j E_ij b_j) / n_valid
    (the old a_i cancels, so a is never stored: every chunk recomputes its rows' a from b);
  * final: q = E · b · (a · n_valid), exact zeros on padding rows.
The per-sample step of a chunk only needs that chunk's rows, so it is fused with the next iteration's
per-prototype sums (same pass), and the last one with the loss.

Teacher-logit passes (matmul + exp over (rows, K)), see `teacher_passes`: Sinkhorn n_iterations + 1
forward (one per-prototype pass, n_iterations - 1 fused per-sample/per-prototype passes, the loss pass
with the last per-sample step); centring 1 (the loss pass, which also sums the logits for the new
centre). Differentiated, the loss pass is a scan of `jax.checkpoint`ed chunks, so the backward pass
recomputes each chunk's teacher targets (+1 teacher pass) and student logits (+1 student-logit
matmul) instead of storing (M, K) residuals. Everything is float32; the teacher is under stop_gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ArrayLike = jax.typing.ArrayLike
CENTERINGS = ("sinkhorn_knopp", "centering")


def _check(centering: str, n_iterations: int) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if centering == "sinkhorn_knopp" and n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs n_iterations >= 1, got {n_iterations}")


def teacher_passes(centering: str, n_iterations: int = 3, *, backward: bool = True) -> int:
    """How many times `ibot_loss_chunked` computes the teacher logits z_t @ W_t of the whole buffer.

    Forward: n_iterations + 1 for Sinkhorn-Knopp, 1 for centring; `backward` adds the checkpointed
    loss pass's recomputation (+1). The student logits are likewise computed once more than in the
    whole computation when differentiated (forward + recomputation in the backward pass).
    """
    _check(centering, n_iterations)
    forward = n_iterations + 1 if centering == "sinkhorn_knopp" else 1
    return forward + int(backward)


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _to_chunks(x: jax.Array, chunk: int, n_chunks: int) -> jax.Array:
    """(G, M, ...) -> (n_chunks, G, chunk, ...), padded along M with zeros / False."""
    g, m = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk - m)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(g, n_chunks, chunk, *x.shape[2:]), 1, 0)


def _logits(z: jax.Array, w: jax.Array) -> jax.Array:
    """(G, C, Db) @ (Db, K) -> (G, C, K), the head's last layer on one chunk."""
    return jnp.einsum("gcd,dk->gck", z, w)


def _teacher_exp(z: jax.Array, w: jax.Array, valid: jax.Array, temp: jax.Array) -> jax.Array:
    """E = exp(t / τ) on valid rows, 0 on padding (no max subtraction, as the official).

    Masks by multiplication (padding logits are finite): a jnp.where against a scalar 0 is a
    (G, C, K) broadcast that XLA may hoist out of the scan as a loop-carried buffer.
    """
    v = valid[..., None].astype(jnp.float32)
    return jnp.exp(_logits(z, w) * v / temp) * v


def _row_scale(e: jax.Array, b: jax.Array, valid: jax.Array, n_valid: jax.Array) -> jax.Array:
    """Per-sample step: a = 1 / (Σ_j E_ij b_j) / n_valid on valid rows, 0 on padding."""
    r = jnp.sum(e * b, axis=-1)
    return jnp.where(valid, 1.0 / jnp.where(valid, r, 1.0) / n_valid, 0.0)


def _col_step(b: jax.Array, u: jax.Array, k: int) -> jax.Array:
    """Per-prototype step from u_j = Σ_i E_ij a_i: q / colsum / K with colsum = b · u."""
    return b / (u * b) / k


def _sum_pass(fn: Callable[..., jax.Array], xs: tuple[jax.Array, ...], shape: tuple[int, int]) -> jax.Array:
    """Σ over chunks of fn(*chunk) -> (G, K) partial sums, then over G (the all-reduce when sharded)."""

    def body(acc: jax.Array, x: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return acc + fn(*x), None

    acc, _ = jax.lax.scan(body, jnp.zeros(shape, jnp.float32), xs)
    return jnp.sum(acc, axis=0)


def _sinkhorn_b(
    zt: jax.Array, wt: jax.Array, valid: jax.Array, temp: jax.Array, n_valid: jax.Array, n_iterations: int
) -> jax.Array:
    """The prototype scale b (K,) after the per-prototype step of the last iteration.

    zt (n_chunks, G, C, Db), valid (n_chunks, G, C). Iteration 1's per-prototype pass starts from
    a = valid; each later one is fused with the previous per-sample step.
    """
    shape = (zt.shape[1], wt.shape[1])
    k = wt.shape[1]

    def first(z: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(_teacher_exp(z, wt, v, temp), axis=1)

    b = _col_step(jnp.ones((k,), jnp.float32), _sum_pass(first, (zt, valid), shape), k)
    for _ in range(n_iterations - 1):

        def fused(z: jax.Array, v: jax.Array, b: jax.Array = b) -> jax.Array:
            e = _teacher_exp(z, wt, v, temp)
            return jnp.sum(e * _row_scale(e, b, v, n_valid)[..., None], axis=1)

        b = _col_step(b, _sum_pass(fused, (zt, valid), shape), k)
    return b


def _sinkhorn_targets(
    z: jax.Array, w: jax.Array, v: jax.Array, b: jax.Array, temp: jax.Array, n_valid: jax.Array
) -> tuple[jax.Array, tuple[()]]:
    """One chunk's Sinkhorn targets: the last per-sample step, then the final · n_valid."""
    e = _teacher_exp(z, w, v, temp)
    return e * b * (_row_scale(e, b, v, n_valid) * n_valid)[..., None], ()


def _centered_targets(
    z: jax.Array, w: jax.Array, v: jax.Array, center: jax.Array, temp: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One chunk's softmax((t - c) / τ) · valid, and Σ over its valid rows of t (G, K) for the new centre."""
    t = _logits(z, w)
    q = jax.nn.softmax((t - center) / temp, axis=-1) * v[..., None]
    return q, jnp.sum(t * v[..., None], axis=1)


def _loss_pass(
    targets: Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]],
    ws: jax.Array,
    xs: tuple[jax.Array, ...],
    aux0: Any,
    student_temp: ArrayLike,
) -> tuple[jax.Array, Any]:
    """Σ_chunks Σ_rows w · CE(q, s) over checkpointed chunks; aux (teacher statistics) summed alongside."""

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk(ws: jax.Array, zs: jax.Array, zt: jax.Array, v: jax.Array, w: jax.Array) -> tuple[jax.Array, Any]:
        q, aux = targets(zt, v)
        q = jax.lax.stop_gradient(q)
        logp = jax.nn.log_softmax(_logits(zs, ws) / student_temp, axis=-1)
        return jnp.sum(w * -jnp.sum(q * logp, axis=-1)), jax.lax.stop_gradient(aux)

    def body(carry: tuple[jax.Array, Any], x: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, Any], None]:
        loss, aux = chunk(ws, *x)
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], aux)), None

    (loss, aux), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), aux0), xs)
    return loss, aux


@functools.partial(jax.jit, static_argnames=("centering", "chunk_size", "n_iterations"))
def ibot_loss_chunked(
    student_z: jax.Array,
    student_w: jax.Array,
    teacher_z: jax.Array,
    teacher_w: jax.Array,
    teacher_temp: ArrayLike,
    valid: jax.Array,
    weights: jax.Array,
    n_global_images: ArrayLike,
    *,
    centering: str = "sinkhorn_knopp",
    center: jax.Array | None = None,
    center_momentum: ArrayLike = 0.9,
    chunk_size: int = 512,
    student_temp: ArrayLike = 0.1,
    n_iterations: int = 3,
) -> tuple[jax.Array, jax.Array | None]:
    """iBOT loss of the masked tokens, and the new centre (None for Sinkhorn-Knopp), chunked along M.

    student_z, teacher_z (G, M, Db): L2-normalised bottleneck features at the masked tokens (padding rows
    finite); student_w, teacher_w (Db, K): effective (weight-normalised) prototype matrices; valid (G, M)
    bool; weights (G, M) = 1 / masked count of the token's image, 0 on padding; center (1, K) for
    "centering". Equal, in value and in gradients w.r.t. student_z / student_w (to float32 rounding), to

        t = teacher_z.reshape(-1, Db) @ teacher_w;  s = student_z.reshape(-1, Db) @ student_w
        q = losses.sinkhorn_knopp(t, teacher_temp, n_iterations, valid=valid.reshape(-1))
            # or losses.softmax_center_teacher(t, center, teacher_temp) * valid.reshape(-1, 1)
        loss = losses.ibot_loss(s, q, weights.reshape(-1), n_global_images, student_temp)
        new_center = losses.update_center(center, t, center_momentum, valid=valid.reshape(-1))

    without any (rows, K) array of the whole buffer; no gradient flows into the teacher.
    """
    _check(centering, n_iterations)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if centering == "centering" and center is None:
        raise ValueError("centering='centering' needs the center")
    g, m, _ = student_z.shape
    k = student_w.shape[1]
    chunk = min(chunk_size, m)
    n_chunks = -(-m // chunk)
    valid = jnp.asarray(valid, bool)
    temp = _f32(teacher_temp)
    ws = _f32(student_w)
    wt = jax.lax.stop_gradient(_f32(teacher_w))
    xs = (
        _to_chunks(_f32(student_z), chunk, n_chunks),
        _to_chunks(jax.lax.stop_gradient(_f32(teacher_z)), chunk, n_chunks),
        _to_chunks(valid, chunk, n_chunks),
        _to_chunks(_f32(weights), chunk, n_chunks),
    )
    n_valid = jnp.sum(valid).astype(jnp.float32)

    if centering == "sinkhorn_knopp":
        b = _sinkhorn_b(xs[1], wt, xs[2], temp, n_valid, n_iterations)
        loss, _ = _loss_pass(lambda z, v: _sinkhorn_targets(z, wt, v, b, temp, n_valid), ws, xs, (), student_temp)
        return loss / _f32(n_global_images), None

    c = jax.lax.stop_gradient(_f32(center))
    loss, tsum = _loss_pass(
        lambda z, v: _centered_targets(z, wt, v, c.reshape(k), temp), ws, xs, jnp.zeros((g, k)), student_temp
    )
    batch_center = jnp.sum(tsum, axis=0) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    new_center = c * center_momentum + batch_center.reshape(c.shape) * (1.0 - center_momentum)
    return loss / _f32(n_global_images), new_center
