"""Per-image probabilities of a trained head as CSV, for image / DICOM files or a data_prep split.

A head trained with its backbone (`backbone.adapt`) is read with that backbone, saved next to it
(workflows.load_head), whatever --checkpoint names."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from chexfound_jax.data import preprocess
from chexfound_jax.eval import loop, reports, tasks
from chexfound_jax.eval.probe import HeadBank, stack_heads
from chexfound_jax.eval.workflows import Environment, load_head, write_predictions


def _predict_arrays(env: Environment, bank: HeadBank, params, rest, images: np.ndarray) -> np.ndarray:
    """(N, K) probabilities of preprocessed images (the same array on every process), in fixed-size batches."""
    size = env.feeder.eval_batch
    sharding = env.feeder.batch_sharding
    out = []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        real = len(chunk)
        chunk = np.concatenate([chunk, np.zeros((size - real, *chunk.shape[1:]), chunk.dtype)])
        x = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
        probs = bank.predict(params, rest, env.feeder.backbone, x, flip=env.feeder.eval_flip)
        probs = multihost_utils.process_allgather(probs, tiled=True)
        out.append(np.asarray(probs)[0, :real])
    return np.concatenate(out) if out else np.zeros((0, bank.cfg.num_classes), np.float32)


def run(env: Environment, workdir: epath.Path, images: Sequence[str] = ()) -> dict:
    """Per-image probabilities of a trained head as CSV, for image/DICOM files or a data_prep split.

    Files that cannot be read are skipped and listed in predict_failures.csv; inputs = written + failed.
    """
    p = env.cfg.predict
    head_cfg, params, rest, meta = load_head(env, p.head)
    names = meta["class_names"]
    bank = env.bank(head_cfg, (0.0,))
    stacked = stack_heads([(params, rest)])
    size = env.feeder.transform.image_size
    files = list(images) or list(p.images)
    failures: list[tuple[str, str]] = []
    if files:
        if head_cfg.views > 1:
            raise ValueError(
                f"{p.head} is a {head_cfg.views}-view head: predict its inputs from shards (predict.split), "
                "where each image's study gives the second view"
            )
        arrays, ids = [], []
        for path in files:
            try:
                arrays.append(preprocess.preprocess(path, resize_size=size, crop_size=size))
                ids.append(epath.Path(path).name.rsplit(".", 1)[0])
            except (preprocess.ImageError, OSError) as e:
                failures.append((str(path), str(e)))
                logging.warning("predict: skipping %s: %s", path, e)
        images_arr = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
        probs = _predict_arrays(env, bank, *stacked, images_arr)
    elif p.split:
        meta_rows = tasks.read_metadata(env.datasets, p.split)
        n = len(meta_rows["image_id"])
        table = tasks.LabelTable(
            task="predict",
            split=p.split,
            shard_split=p.split,
            record_index=np.arange(n, dtype=np.int64),
            labels=np.full((n, len(names)), np.nan, np.float32),
            patient_id=meta_rows["patient_id"],
            image_id=meta_rows["image_id"],
            path=meta_rows["path"],
            second_record=tasks.second_views(meta_rows) if head_cfg.views > 1 else None,
        )
        probs = loop.predict(env.feeder, bank, *stacked, env.records(table))[0]
        ids = list(table.image_id)
    else:
        raise ValueError("nothing to predict: give image files, predict.images, or predict.split with data.datasets")
    summary = {
        "inputs": len(files) if files else len(ids),
        "written": len(ids),
        "failed": len(failures),
        "head": p.head,
        "classes": names,
    }
    if summary["inputs"] != summary["written"] + summary["failed"]:  # pragma: no cover - a bug, not bad input
        raise AssertionError(f"predict counts do not reconcile: {summary}")
    if env.lead:
        workdir.mkdir(parents=True, exist_ok=True)
        write_predictions(workdir / p.output, ids, probs, names, p.id_column)
        if failures:
            buf = io.StringIO()
            csv.writer(buf).writerows([("path", "reason"), *failures])
            (workdir / "predict_failures.csv").write_text(buf.getvalue())
        reports.write_json(workdir / "predict_summary.json", summary)
    logging.info("predict: %d images -> %s (%d skipped)", len(ids), workdir / p.output, len(failures))
    return summary
