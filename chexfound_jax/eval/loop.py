"""Driving a HeadBank over data: training with periodic validation, and ordered prediction.

Works the same on one CPU, a GPU mesh or a multi-host TPU slice: each process reads the block of the
global batch its devices hold (`process_data_shard`), and predictions are gathered on every process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from chexfound_jax.data import classification
from chexfound_jax.data.pipeline import DeviceIterator, global_batch, process_data_shard
from chexfound_jax.eval.probe import HeadBank, check_flip
from chexfound_jax.jobs.checkpoint import Checkpointer
from chexfound_jax.jobs.progress import Progress


@dataclasses.dataclass
class Feeder:
    """Where batches come from and how they are cut: shared by training and prediction."""

    mesh: jax.sharding.Mesh
    backbone: Any  # the FrozenFeatures state, replicated on the mesh
    transform: classification.TrainTransform
    global_batch: int
    eval_batch: int
    read_threads: int = 4
    read_buffer: int = 8
    num_workers: int = 0
    eval_flip: str = "none"  # eval.flip: none | only (the official --flip) | average (test-time augmentation)

    def __post_init__(self):
        check_flip(self.eval_flip)

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh.axis_names))

    def shard(self, batch: int) -> tuple[int, int]:
        """(index, count) of the data shard this process reads for a global batch of `batch`."""
        return process_data_shard(self.batch_sharding, batch)

    def shardings(self, local: dict) -> dict:
        axes = self.mesh.axis_names
        return {
            k: jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(axes, *[None] * (np.ndim(v) - 1)))
            for k, v in local.items()
        }

    def _iter(self, ds: grain.MapDataset) -> grain.IterDataset:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.read_buffer))
        if self.num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=2))
        return it

    def eval_batches(self, records: classification.LabelledRecords) -> grain.IterDataset:
        """This process's share of every evaluation batch of `records` (unshuffled, padded, in row order)."""
        index, count = self.shard(self.eval_batch)
        ds = classification.eval_batches(
            records,
            self.transform.image_size,
            batch_size=self.eval_batch // count,
            shard_index=index,
            shard_count=count,
        )
        return self._iter(ds)


def fit(
    feeder: Feeder,
    bank: HeadBank,
    state: dict,
    records: classification.LabelledRecords,
    *,
    seed: int,
    steps: int,
    log: dict,
    on_step: Callable[[int, dict], None] | None = None,
    on_log: Callable[[int, np.ndarray], None] | None = None,
    log_every: int = 50,
    checkpointer: Checkpointer | None = None,
    config: Any = None,
) -> dict:
    """Trains the bank from state["step"] to `steps`; on_step(step, state) runs after each update.

    Every `log_every` steps (and at the end) the per-head losses are appended to log["losses"] as
    (step, list) and passed to on_log(step, losses). With a `checkpointer`, the run resumes from its
    latest checkpoint (state and `log`, which must stay JSON-able) and saves at its interval, on
    preemption and at the end. The data position is the step: batch s of `train_batches` is the same
    whichever step a run resumes at.
    """
    log.setdefault("losses", [])
    if checkpointer is not None and checkpointer.latest_step() is not None:
        try:
            _refuse_other_config(checkpointer, checkpointer.saved_config(), config)
        except (OSError, json.JSONDecodeError):
            pass  # the newest step is damaged: restore_newest names it and checks the step it falls back to
        abstract = bank.abstract_state()
        shardings = bank.state_shardings(abstract)
        # the newest checkpoint that restores whole (a damaged one is named, skipped and kept)
        _, state, saved, saved_config = checkpointer.restore_newest(abstract_state=abstract, shardings=shardings)
        _refuse_other_config(checkpointer, saved_config, config)
        log.clear()
        log.update(saved)
        logging.info("resumed head training at step %d from %s", int(state["step"]), checkpointer.directory)
    start = int(jax.device_get(state["step"]))
    if start >= steps:
        return state
    index, count = feeder.shard(feeder.global_batch)
    local_batch = feeder.global_batch // count
    ds = classification.train_batches(
        records, feeder.transform, batch_size=local_batch, seed=seed, shard_index=index, shard_count=count
    )[start:steps]
    shapes = {
        "image": np.zeros((1,) * (4 if records.views == 1 else 5)),
        "labels": np.zeros((1, 1)),
        "row": np.zeros(1),
    }
    it = DeviceIterator(feeder._iter(ds), feeder.shardings(shapes), feeder.global_batch)
    rng = jax.random.key(seed)
    progress = Progress(steps, start, images_per_step=feeder.global_batch)
    try:
        for step in range(start + 1, steps + 1):
            batch, _ = next(it)
            state, losses = bank.train_step(state, feeder.backbone, {k: batch[k] for k in ("image", "labels")}, rng)
            if step % log_every == 0 or step == steps:
                host = np.asarray(jax.device_get(losses))
                log["losses"].append((step, host.tolist()))
                if on_log is not None:
                    on_log(step, host)
                logging.info("%s loss per head %s", progress.tick(step), np.array2string(host, precision=4))
            if on_step is not None:
                on_step(step, state)
            if checkpointer is not None and (step == steps or checkpointer.should_save(step)):
                checkpointer.save(step, state, log, config or {}, force=step == steps)
    finally:
        it.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state


# What a resumed head training must share with the run that checkpointed it (logging, checkpoint
# intervals, reports and the number of reader threads may change).
RESUME_KEYS = (
    "workflow", "task", "head", "backbone", "data.datasets", "data.image_size", "data.train_scale", "data.flip_p",
    "data.rot90_p", "data.train_minmax", "train.lrs", "train.weight_decay", "train.asymmetric_loss",
    "train.batch_size", "train.val_epochs", "train.epochs", "train.seed", "refit.warm_start", "label_efficiency",
)  # fmt: skip


def _refuse_other_config(checkpointer: Checkpointer, saved: Mapping[str, Any], config: Any) -> None:
    if config is not None and (changed := config_changes(saved, config)):
        raise ValueError(
            f"{checkpointer.directory} holds head training of another configuration (changed: "
            f"{', '.join(changed)}): use a new workdir or remove it to start over"
        )


def config_changes(saved: Mapping[str, Any], config: Any, keys: Sequence[str] = RESUME_KEYS) -> list[str]:
    """The dotted `keys` whose values differ between a checkpoint's saved config dict and `config`."""
    current = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))

    def get(tree: Any, key: str) -> Any:
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        return tree

    return [k for k in keys if get(saved, k) != get(current, k)]


def predict(
    feeder: Feeder, bank: HeadBank, params: Any, rest: Any, records: classification.LabelledRecords
) -> np.ndarray:
    """Probabilities (H, N, K) of the stacked heads for every row of `records`, in row order, on every process."""
    shardings = None
    out = np.full((bank.size, len(records), bank.cfg.num_classes), np.nan, np.float32)
    for local in feeder.eval_batches(records):
        shardings = shardings or feeder.shardings(local)
        batch = global_batch(local, shardings, feeder.eval_batch)
        probs = bank.predict(params, rest, feeder.backbone, batch["image"], flip=feeder.eval_flip)
        probs, rows, valid = (
            np.asarray(x) for x in multihost_utils.process_allgather((probs, batch["row"], batch["valid"]), tiled=True)
        )
        out[:, rows[valid]] = probs[:, valid]
    return out
