"""Weighted k-nearest-neighbour classification on frozen features (the DINO / DINOv2 protocol).

Cosine similarity between L2-normalised features; each query's k most similar training images vote
with weights softmax(similarity / T) over those k (DINOv2's `eval_knn`, T = 0.07). For multi-label
tasks each class gets its own score, the weighted mean of the neighbours' labels; neighbours whose
label for a class is unknown (NaN) are left out of that class's mean, as the probes mask them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TEMPERATURE = 0.07


def l2_normalize(x: jax.Array | np.ndarray, eps: float = 1e-12) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _neighbours(train: jax.Array, labels: jax.Array, queries: jax.Array, k: int):
    """(similarities, labels with unknown as 0, known mask) of the k nearest training rows of each query."""
    sims, idx = jax.lax.top_k(queries @ train.T, k)  # (Q, k), most similar first
    neighbour_labels = labels[idx]  # (Q, k, C), NaN where unknown
    known = ~jnp.isnan(neighbour_labels)
    return sims, jnp.where(known, neighbour_labels, 0.0), known


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    ks: Sequence[int] = (20,),
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
) -> dict[int, np.ndarray]:
    """{k: (Q, C) class scores in [0, 1]} for every k at once (one top-k of the largest k).

    `train_labels` (N, C) holds 1, 0 or NaN (unknown). A class none of a query's neighbours knows
    scores NaN. Queries go in chunks of `chunk`, so the (Q, N) similarities never exist whole.
    """
    train_labels = np.asarray(train_labels, np.float32)
    if train_labels.ndim != 2 or len(train_labels) != len(train_features):
        raise ValueError(f"train_labels {train_labels.shape} must be (N, C) for {len(train_features)} features")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    k_max = min(max(ks), len(train_features))
    train = l2_normalize(train_features)
    labels = jnp.asarray(train_labels)
    queries = l2_normalize(query_features)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(queries), chunk):
        sims, values, known = _neighbours(train, labels, queries[start : start + chunk], k_max)
        for k in ks:
            kk = min(k, k_max)
            w = jax.nn.softmax(sims[:, :kk] / temperature, axis=-1)[..., None]  # (Q, kk, 1)
            total = jnp.sum(w * known[:, :kk], axis=1)
            score = jnp.sum(w * values[:, :kk], axis=1) / jnp.where(total > 0, total, 1.0)
            out[k].append(np.asarray(jnp.where(total > 0, score, jnp.nan)))
    return {k: np.concatenate(v) for k, v in out.items()}
