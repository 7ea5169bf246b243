"""Multilabel losses of the downstream protocol (official linear_glori.py), with unknown labels masked.

Labels are float: 1 positive, 0 negative, NaN (or < 0) unknown. Unknown entries contribute nothing,
as the official `BCEWithLogitsLoss(weight=1[label >= 0], reduction="sum")` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def known(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask of known labels, labels with unknowns set to 0)."""
    mask = jnp.isfinite(labels) & (labels >= 0)
    return mask, jnp.where(mask, labels, 0.0)


def masked_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over the batch and classes of BCE-with-logits on the known labels."""
    mask, y = known(labels)
    loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y)
    return jnp.sum(jnp.where(mask, loss, 0.0))


def asymmetric_loss(
    logits: jax.Array,
    labels: jax.Array,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> jax.Array:
    """Asymmetric Loss (Ridnik et al. 2021) summed over known labels; the focusing weight is not differentiated.

    Negatives are shifted by `clip` (probability margin) and down-weighted by (1 - p_neg)^gamma_neg.
    """
    mask, y = known(labels)
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    p_neg = jnp.minimum(1.0 - p + clip, 1.0) if clip > 0 else 1.0 - p
    loss = y * jnp.log(jnp.maximum(p, eps)) + (1.0 - y) * jnp.log(jnp.maximum(p_neg, eps))
    pt = p * y + p_neg * (1.0 - y)
    weight = jax.lax.stop_gradient(jnp.power(1.0 - pt, gamma_pos * y + gamma_neg * (1.0 - y)))
    return -jnp.sum(jnp.where(mask, loss * weight, 0.0))


def head_loss(logits: jax.Array, labels: jax.Array, asymmetric: bool = False) -> jax.Array:
    """The training loss: summed masked BCE, plus the Asymmetric Loss when `asymmetric` (`--focal-loss`)."""
    loss = masked_bce(logits, labels)
    if asymmetric:
        loss = loss + asymmetric_loss(logits, labels)
    return loss
