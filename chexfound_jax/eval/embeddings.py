"""Frozen class-token embeddings of evaluation splits, computed once and cached in the work directory.

The kNN and logistic-regression evaluations of DINOv2 (eval/knn.py, eval/log_regression.py) read the
backbone's output, `x_norm_clstoken`: the class token after the final norm. Each split is embedded
once with the evaluation preprocessing (resize the shorter side, centre crop, per-channel min-max,
ImageNet normalisation) on the configured mesh, images split over every device as in the probes'
prediction, and stored as `workdir/features/<split>.npz`. A rerun reads the file back when it was made
from the same checkpoint (and backbone.num_heads), datasets, task rows, image size, dtype and flip;
otherwise it embeds again.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from chexfound_jax.data import classification
from chexfound_jax.data.pipeline import global_batch
from chexfound_jax.eval import tasks

FLIPS = ("none", "only")  # eval.flip "average" averages probabilities, which a feature has none of


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _embed(graphdef: nnx.GraphDef, dtype: Any, flip: str, state: nnx.State, images: jax.Array) -> jax.Array:
    if flip == "only":
        images = images[..., ::-1, :]  # the official --flip: mirrored images (after Normalize, as before it)
    model = nnx.merge(graphdef, state)
    return model.forward_features(images.astype(dtype))["x_norm_clstoken"].astype(jnp.float32)


def class_tokens(env: Any, records: classification.LabelledRecords) -> np.ndarray:
    """(N, D) float32 final-norm class tokens of every row of `records`, in row order, on every process."""
    if records.views != 1:
        raise ValueError(f"{env.cfg.workflow} reads one view per image: set task.multiview=False")
    flip = str(env.cfg.eval.flip)
    if flip not in FLIPS:
        raise ValueError(f"eval.flip must be one of {FLIPS} for {env.cfg.workflow}, got {flip!r}")
    feeder, static = env.feeder, (env.features.graphdef, env.features.cfg.compute_dtype, flip)
    out = np.full((len(records), env.features.cfg.embed_dim), np.nan, np.float32)
    shardings = None
    for local in feeder.eval_batches(records):
        shardings = shardings or feeder.shardings(local)
        batch = global_batch(local, shardings, feeder.eval_batch)
        feats = _embed(*static, feeder.backbone, batch["image"])
        feats, rows, valid = (
            np.asarray(x) for x in multihost_utils.process_allgather((feats, batch["row"], batch["valid"]), tiled=True)
        )
        out[rows[valid]] = feats[valid]
    return out


def _identity(env: Any, table: tasks.LabelTable) -> dict:
    """What the cached features depend on (besides the rows, compared as record_index)."""
    return {
        "checkpoint": env.checkpoint,
        "num_heads": env.cfg.backbone.num_heads,
        "datasets": [str(d) for d in env.datasets],
        "task": table.task,
        "split": table.split,
        "shard_split": table.shard_split,
        "image_size": int(env.feeder.transform.image_size),
        "dtype": str(env.cfg.backbone.dtype),
        "flip": str(env.cfg.eval.flip),
        "feature": "x_norm_clstoken",
    }


def _read(path: epath.Path, identity: dict, table: tasks.LabelTable) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes())) as z:
            same = json.loads(str(z["identity"])) == identity and np.array_equal(z["record_index"], table.record_index)
            return np.asarray(z["features"], np.float32) if same else None
    except (OSError, ValueError, KeyError) as e:
        logging.warning("%s unreadable (%s): embedding again", path, e)
        return None


def split_features(env: Any, workdir: epath.Path, table: tasks.LabelTable) -> np.ndarray:
    """(N, D) class tokens of a task split: from `workdir/features/<split>.npz` when it matches, else
    embedded (and written there by process 0, with the split's labels and image ids for reuse)."""
    path = epath.Path(workdir) / "features" / f"{table.split}.npz"
    identity = _identity(env, table)
    cached = _read(path, identity, table)
    if cached is not None:
        logging.info("features of %s: %d x %d from %s", table.split, *cached.shape, path)
        return cached
    logging.info("embedding %s: %d images", table.split, len(table))
    features = class_tokens(env, env.records(table))
    if env.lead:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(
            buf,
            features=features,
            labels=table.labels,
            image_id=np.asarray(table.image_id, str),
            record_index=np.asarray(table.record_index),
            identity=np.asarray(json.dumps(identity, sort_keys=True)),
        )
        path.write_bytes(buf.getvalue())
    return features
