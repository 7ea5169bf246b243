"""Weighted k-nearest-neighbour classification on frozen features (the DINO / DINOv2 protocol).

Cosine similarity between L2-normalised features; each query's k most similar training images vote
with weights softmax(similarity / T) over those k (DINOv2's `eval_knn`, T = 0.07). For multi-label
tasks each class gets its own score, the weighted mean of the neighbours' labels; neighbours whose
label for a class is unknown (NaN) are left out of that class's mean, as the probes mask them.

Given a mesh, the training features are sharded by rows over every device: each device takes the top k
of its rows, and the devices' candidates are gathered and cut to the global top k (exact: the global
k nearest are among the union of the per-device k nearest), so no device holds the whole bank.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


@functools.lru_cache(maxsize=8)
def _sharded_neighbours(mesh: Mesh, k: int):
    """_neighbours with the training rows sharded over every axis of `mesh` (queries replicated)."""
    axes = mesh.axis_names
    rows = PartitionSpec(axes)

    def local(train, labels, real, queries):
        sims = jnp.where(real[None, :], queries @ train.T, -jnp.inf)  # padding rows are never neighbours
        sims, idx = jax.lax.top_k(sims, min(k, train.shape[0]))
        candidates = labels[idx]
        sims = jax.lax.all_gather(sims, axes, axis=1, tiled=True)  # (Q, devices * k), in row order of devices
        candidates = jax.lax.all_gather(candidates, axes, axis=1, tiled=True)
        sims, pick = jax.lax.top_k(sims, k)
        neighbour_labels = jnp.take_along_axis(candidates, pick[..., None], axis=1)
        known = ~jnp.isnan(neighbour_labels)
        return sims, jnp.where(known, neighbour_labels, 0.0), known

    specs = (rows, rows, rows, PartitionSpec())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False))


def _put_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """`x` (identical on every process) sharded by rows over every mesh axis."""
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _bank(train: jax.Array, labels: np.ndarray, mesh: Mesh | None, k: int):
    """The neighbour search over the (normalised) training rows: a function of a chunk of queries."""
    if mesh is None:
        labels = jnp.asarray(labels)
        return lambda queries: _neighbours(train, labels, queries, k)
    n, pad = len(labels), -len(labels) % mesh.size
    real = np.arange(n + pad) < n
    train = _put_rows(np.pad(np.asarray(train), ((0, pad), (0, 0))), mesh)
    labels = _put_rows(np.pad(labels, ((0, pad), (0, 0)), constant_values=np.nan), mesh)
    real = _put_rows(real, mesh)
    search = _sharded_neighbours(mesh, k)
    replicated = NamedSharding(mesh, PartitionSpec())
    return lambda queries: search(train, labels, real, jax.device_put(queries, replicated))


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    ks: Sequence[int] = (20,),
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
    mesh: Mesh | None = None,
) -> dict[int, np.ndarray]:
    """{k: (Q, C) class scores in [0, 1]} for every k at once (one top-k of the largest k).

    `train_labels` (N, C) holds 1, 0 or NaN (unknown). A class none of a query's neighbours knows
    scores NaN. Queries go in chunks of `chunk`, so the (Q, N) similarities never exist whole. With
    `mesh`, the training rows are sharded over its devices (module docstring); the scores are the same.
    """
    train_labels = np.asarray(train_labels, np.float32)
    if train_labels.ndim != 2 or len(train_labels) != len(train_features):
        raise ValueError(f"train_labels {train_labels.shape} must be (N, C) for {len(train_features)} features")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    k_max = min(max(ks), len(train_features))
    search = _bank(l2_normalize(train_features), train_labels, mesh, k_max)
    queries = np.asarray(l2_normalize(query_features))
    n = len(queries)
    chunk = max(1, min(chunk, n))
    queries = np.pad(queries, ((0, -n % chunk), (0, 0)))  # every chunk one shape: one compilation
    sizes = tuple(min(k, k_max) for k in ks)
    out: list[list[np.ndarray]] = []
    for start in range(0, len(queries), chunk):
        sims, values, known = search(queries[start : start + chunk])
        out.append([np.asarray(s) for s in _votes(sims, values, known, sizes, temperature)])
    return {k: np.concatenate([part[i] for part in out])[:n] for i, k in enumerate(ks)}


@functools.partial(jax.jit, static_argnames=("sizes",))
def _votes(sims: jax.Array, values: jax.Array, known: jax.Array, sizes: tuple[int, ...], temperature: float):
    """The (Q, C) scores of the `k` nearest neighbours for each k in `sizes` (neighbours sorted by similarity)."""
    scores = []
    for k in sizes:
        w = jax.nn.softmax(sims[:, :k] / temperature, axis=-1)[..., None]  # (Q, k, 1)
        total = jnp.sum(w * known[:, :k], axis=1)
        score = jnp.sum(w * values[:, :k], axis=1) / jnp.where(total > 0, total, 1.0)
        scores.append(jnp.where(total > 0, score, jnp.nan))
    return scores
