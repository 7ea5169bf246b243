"""Online evaluation during pretraining: is the teacher learning features, or collapsing?

Every `eval_online.every` steps the pretraining job embeds a labelled, patient-split data_prep dataset
with the current teacher (its normalised class token, the official evaluation preprocessing) and logs:

  online/knn_auroc, online/knn_accuracy   weighted kNN (k = 20, cosine, T = 0.07; chexfound_jax.eval.knn)
                                          of the test part against the train part
  online/linear_auroc                     a closed-form ridge-regression probe on standardised features
  online/feature_std                      mean per-dimension std of the L2-normalised class tokens; a
                                          collapsed teacher gives ~0, isotropic features 1/sqrt(D)
  online/effective_rank                   RankMe, exp(entropy of the normalised singular values), of the
                                          test features: 1 for a collapse to one direction, up to D

AUROC and accuracy are macro means over the classes with both labels present in the test part. The
embedding runs sharded on the job's mesh (images split over the batch axes, the teacher as stored) and
every process computes the same figures from the gathered features, so it is multi-host safe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chexfound_jax.data import classification
from chexfound_jax.data.pipeline import global_batch, process_data_shard
from chexfound_jax.eval import knn, metrics, tasks
from chexfound_jax.models.vit import VisionTransformer, ViTConfig
from chexfound_jax.parallel import activations
from chexfound_jax.parallel.sharding import Rules

SPLITS = ("train", "test")
CACHE_BYTES = 2 * 1024**3  # keep preprocessed images in host memory below this, else decode every time


def ridge_probe_scores(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """(Q, C) scores of a per-class ridge regression with intercept on standardised features.

    Minimises ||Z w + b - y||^2 / n + alpha ||w||^2 over the training rows whose label for the class is
    known (Z: features standardised with the training mean and std), in closed form: the dual
    (n x n) system when there are fewer rows than dimensions.
    """
    x = np.asarray(train_features, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z, q = (x - mean) / std, (np.asarray(test_features, np.float64) - mean) / std
    labels = np.asarray(train_labels, np.float64)
    out = np.full((len(q), labels.shape[1]), np.nan)
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        if known.sum() < 2:
            continue
        zc, yc = z[known], labels[known, c]
        zc_mean, y_mean = zc.mean(0), yc.mean()
        zc, yc = zc - zc_mean, yc - y_mean
        n, d = zc.shape
        if n < d:  # w = Z^T (Z Z^T + n alpha I)^-1 y
            w = zc.T @ np.linalg.solve(zc @ zc.T + n * alpha * np.eye(n), yc)
        else:
            w = np.linalg.solve(zc.T @ zc + n * alpha * np.eye(d), zc.T @ yc)
        out[:, c] = (q - zc_mean) @ w + y_mean
    return out


def collapse_monitors(features: np.ndarray) -> dict[str, float]:
    """feature_std (of the L2-normalised rows, mean over dimensions) and effective_rank (RankMe)."""
    x = np.asarray(features, np.float64)
    normed = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = np.linalg.svd(x, compute_uv=False)
    p = s / max(s.sum(), 1e-12) + 1e-12
    return {"feature_std": float(normed.std(0).mean()), "effective_rank": float(np.exp(-np.sum(p * np.log(p))))}


def macro_scores(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Macro AUROC and accuracy (score > 0.5) over classes with both labels among the scored rows."""
    aurocs, accs = [], []
    for c in range(labels.shape[1]):
        ok = ~np.isnan(labels[:, c]) & ~np.isnan(scores[:, c])
        y, s = labels[ok, c], scores[ok, c]
        if len(np.unique(y)) == 2:
            aurocs.append(metrics.auroc(y, s))
            accs.append(float(np.mean((s > 0.5) == (y > 0.5))))
    nan = float("nan")
    return {"auroc": float(np.mean(aurocs)) if aurocs else nan, "accuracy": float(np.mean(accs)) if accs else nan}


@dataclasses.dataclass
class _Split:
    records: classification.LabelledRecords
    cache: list[dict] | None = None


class OnlineEval:
    """The `eval_online` section of a pretraining config, bound to the job's backbone and mesh."""

    def __init__(self, cfg: Any, vit_cfg: ViTConfig, mesh: Mesh, rules: Rules, default_image_size: int):
        if not cfg.datasets:
            raise ValueError("eval_online.datasets is empty: name the labelled data_prep datasets to evaluate on")
        self.cfg = cfg
        self.every = int(cfg.every)
        self.image_size = int(cfg.image_size or default_image_size)
        task = tasks.task_from_config(cfg.task)
        tables = tasks.load_task(list(cfg.datasets), task, SPLITS)
        for name, table in tables.items():
            if len(table.record_index) == 0:
                raise ValueError(f"eval_online: the {name!r} split of task {task.name!r} is empty")
        self.splits = {s: _Split(classification.LabelledRecords(list(cfg.datasets), [tables[s]])) for s in SPLITS}
        self.class_names = task.class_names
        self.mesh = mesh
        batch_axes = activations.ActivationSharding(mesh, tuple(rules)).batch_axes()
        shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
        self.batch_size = max(shards, -(-int(cfg.batch_size) // shards) * shards)
        self.images_sharding = NamedSharding(mesh, PartitionSpec(batch_axes or None))
        replicated = NamedSharding(mesh, PartitionSpec())
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: VisionTransformer(vit_cfg, rngs=nnx.Rngs(0))))

        def embed(params: dict, images: jax.Array) -> jax.Array:
            with activations.activation_sharding(mesh, rules):
                vit = nnx.merge(graphdef, nnx.State(params))
                x = vit.forward_features(images.astype(vit_cfg.compute_dtype))["x_norm_clstoken"]
            return x.astype(jnp.float32)

        self._embed = jax.jit(embed, out_shardings=replicated)
        self._gather = jax.jit(lambda x: x, out_shardings=replicated)

    def due(self, step: int, total_steps: int) -> bool:
        """At step 0 (the initialisation), every `every` steps and at the last step; never when every = 0."""
        return self.every > 0 and (step % self.every == 0 or step == total_steps)

    def _local_batches(self, split: _Split) -> Iterator[dict]:
        if split.cache is not None:
            yield from split.cache
            return
        index, count = process_data_shard(self.images_sharding, self.batch_size)
        ds = classification.eval_batches(
            split.records, self.image_size, batch_size=self.batch_size // count, shard_index=index, shard_count=count
        )
        batches, size = [], 0
        for local in ds:
            yield local
            size += local["image"].nbytes
            batches.append(local)
        split.cache = batches if size <= CACHE_BYTES else None

    def features(self, backbone: dict, split: str) -> np.ndarray:
        """(N, D) teacher class tokens of a split, in its row order."""
        part = self.splits[split]
        out = None
        shardings = None
        for local in self._local_batches(part):
            if shardings is None:
                shardings = {
                    k: NamedSharding(self.mesh, PartitionSpec(self.images_sharding.spec[0], *[None] * (v.ndim - 1)))
                    for k, v in local.items()
                }
            batch = global_batch(local, shardings, self.batch_size)
            feats = np.asarray(self._embed(backbone, batch["image"]))
            rows, valid = (np.asarray(self._gather(batch[k])) for k in ("row", "valid"))
            if out is None:
                out = np.full((len(part.records), feats.shape[1]), np.nan, np.float32)
            out[rows[valid]] = feats[valid]
        return out

    def __call__(self, backbone: dict) -> dict[str, float]:
        """The online/* scalars for the teacher backbone parameters `backbone` (sharded as in the state)."""
        train, test = self.features(backbone, "train"), self.features(backbone, "test")
        y_train, y_test = self.splits["train"].records.labels, self.splits["test"].records.labels
        k = int(self.cfg.k)
        knn_scores = knn.knn_scores(train, y_train, test, (k,), float(self.cfg.temperature))[k]
        values = {f"knn_{m}": v for m, v in macro_scores(y_test, knn_scores).items()}
        linear = ridge_probe_scores(train, y_train, test, float(self.cfg.ridge_alpha))
        values["linear_auroc"] = macro_scores(y_test, linear)["auroc"]
        values |= collapse_monitors(test)
        return {f"online/{name}": value for name, value in values.items()}
