"""Input pipelines for classification heads on a frozen backbone (official linear_glori.py train / eval transforms).

A labelled table (`chexfound_jax.eval.tasks.LabelTable`: records of a data_prep split plus the task's
labels) becomes batches of model inputs. Training batches are an infinite, per-epoch reshuffled stream
with the official classification augmentation; evaluation batches are ordered and padded to full
batches with a `valid` mask. Like the pretraining pipeline, every element is a function of its index,
so a run restarted at step s sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from etils import epath
from PIL import Image

from chexfound_jax.data import augment, preprocess
from chexfound_jax.data.pipeline import BadRecordError, ShardedSource, decode_image, record_order


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(scale 0.75-1, bicubic) + HFlip [+ Rot90], then per-channel min-max and Normalize.

    `minmax`: the per-channel min-max rescale (`RescaleImage`, official data/transforms.py), which the official
    train transform applies as its eval transform does (the default). A constant crop is left unscaled instead
    of dividing by zero.
    """

    image_size: int = 512
    scale: tuple[float, float] = (0.75, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    rot90_p: float = 0.0  # --rot90-train: 0.5, k uniform in {1, 2, 3}
    minmax: bool = True
    mean: tuple[float, float, float] = preprocess.IMAGENET_MEAN
    std: tuple[float, float, float] = preprocess.IMAGENET_STD


def train_image(image: np.ndarray, rng: np.random.Generator, t: TrainTransform) -> np.ndarray:
    """A stored (H, W) uint8/uint16 record image -> (S, S, 3) float32 augmented model input."""
    img = Image.fromarray(augment.to_uint8(image))
    top, left, h, w = augment.random_resized_crop_box(rng, img.height, img.width, t.scale, t.ratio)
    crop = img.crop((left, top, left + w, top + h)).resize((t.image_size, t.image_size), Image.Resampling.BICUBIC)
    x = np.asarray(crop, np.uint8)
    if rng.random() < t.flip_p:
        x = x[:, ::-1]
    if t.rot90_p and rng.random() < t.rot90_p:
        x = np.rot90(x, k=int(rng.integers(1, 4)))  # square crops: torchvision's expand=True keeps the size
    x = np.repeat(x[..., None].astype(np.float32) / np.float32(255), 3, axis=-1)
    if t.minmax:
        lo, hi = x.min(), x.max()
        if hi > lo:  # the three channels are equal, so one range serves all
            x = (x - lo) / (hi - lo)
    return preprocess.normalize(x, t.mean, t.std)


def eval_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """The official notebook's evaluation preprocessing (`make_classification_eval_transform`) on a stored image."""
    img = Image.fromarray(augment.to_uint8(image)).convert("RGB")
    return preprocess.preprocess_image(img, resize_size=image_size, crop_size=image_size)


class LabelledRecords:
    """The rows of one or more label tables, each resolved to its shard record; row r -> (image, labels).

    Several tables are concatenated in order (the train+val refit); tables may read different data_prep
    splits of the same datasets. With multiview tables (`second_record` set) every row has two views and
    the batches' images are (2, S, S, 3): the row's image, then its study's second view.
    """

    def __init__(self, datasets: Sequence[epath.PathLike], tables: Sequence[Any]):
        if not tables:
            raise ValueError("no label tables given")
        widths = {t.labels.shape[1] for t in tables}
        if len(widths) != 1:
            raise ValueError(f"label tables have different class counts: {sorted(widths)}")
        self.datasets = list(datasets)
        self._sources: dict[str, ShardedSource] = {}
        self.split_of = np.concatenate([np.full(len(t.record_index), i, np.int32) for i, t in enumerate(tables)])
        self.record = np.concatenate([np.asarray(t.record_index, np.int64) for t in tables])
        self.labels = np.concatenate([np.asarray(t.labels, np.float32) for t in tables])
        self._splits = [t.shard_split for t in tables]
        second = [getattr(t, "second_record", None) for t in tables]
        paired = {s is not None for s in second}
        if len(paired) != 1:
            raise ValueError("label tables mix single-view and multiview tables")
        self.second = np.concatenate([np.asarray(s, np.int64) for s in second]) if paired.pop() else None

    def __len__(self) -> int:
        return len(self.record)

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1]

    def source(self, split: str) -> ShardedSource:
        if split not in self._sources:
            self._sources[split] = ShardedSource(self.datasets, split)
        return self._sources[split]

    @property
    def views(self) -> int:
        return 1 if self.second is None else 2

    def split(self, row: int) -> str:
        """The data_prep split a row's records are in."""
        return self._splits[self.split_of[row]]

    def record_of(self, row: int, view: int = 0) -> int:
        """The shard record of a row's view (0: the row's own record, 1: its second view)."""
        return int((self.record if view == 0 else self.second)[row])

    def image(self, row: int, view: int = 0) -> np.ndarray:
        """The stored image of a row's view."""
        image, _ = decode_image(self.source(self.split(row)), self.record_of(row, view))
        return image

    def images(self, row: int) -> list[np.ndarray]:
        """Every view of a row."""
        return [self.image(row, v) for v in range(self.views)]


def train_batches(
    records: LabelledRecords,
    transform: TrainTransform,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Infinite MapDataset of this data shard's local batches {"image", "labels", "row"}.

    Batch s holds elements [s * b, (s + 1) * b) of `record_order`: a fresh permutation of all rows each
    epoch, cut [shard::count], so the shards' batches together form the global batch. Slice it
    (`ds[start:]`) to resume at step `start`.
    """
    if len(records) < shard_count:
        raise ValueError(f"{len(records)} training images cannot feed {shard_count} data shards")
    order = record_order(len(records), seed, shard_index, shard_count)

    def example(row: Any, rng: np.random.Generator) -> dict:
        row = int(row)
        views = [train_image(image, rng, transform) for image in records.images(row)]  # independent augmentations
        return {
            "image": views[0] if records.views == 1 else np.stack(views),
            "labels": records.labels[row],
            "row": np.int64(row),
        }

    return order.random_map(example, seed=seed).batch(batch_size, drop_remainder=True)


def eval_batches(
    records: LabelledRecords,
    image_size: int,
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Ordered local batches {"image", "labels", "row", "valid"} of every row, padded to full global batches.

    `row` is the position in `records` (-1 for padding) to join predictions back to the table.
    """
    n = len(records)
    per_round = batch_size * shard_count
    padded = -(-n // per_round) * per_round
    width = records.num_classes
    shape = (image_size, image_size, 3) if records.views == 1 else (records.views, image_size, image_size, 3)

    def example(i: Any) -> dict:
        i = int(i)
        if i >= n:
            return {
                "image": np.zeros(shape, np.float32),
                "labels": np.full(width, np.nan, np.float32),
                "row": np.int64(-1),
                "valid": np.bool_(False),
            }
        views = []
        for v in range(records.views):
            try:
                views.append(eval_image(records.image(i, v), image_size))
            except ValueError as e:
                if isinstance(e, BadRecordError):
                    raise
                raise BadRecordError(f"{records.split(i)} record {records.record_of(i, v)}: {e}") from e
        x = views[0] if records.views == 1 else np.stack(views)
        return {"image": x, "labels": records.labels[i], "row": np.int64(i), "valid": np.bool_(True)}

    ds = grain.MapDataset.range(padded)[shard_index::shard_count].map(example)
    return ds.batch(batch_size)


def num_batches(n: int, global_batch: int) -> int:
    """Batches of one epoch: ceil(n / batch), as the official epoch_length."""
    return -(-n // global_batch)
