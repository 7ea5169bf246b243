"""Classification input pipelines on real shards: augmentation, determinism, resume, padding, row joins."""

import types

import numpy as np
import pytest
import synthetic
from PIL import Image

from chexfound_jax.data import augment, classification, preprocess
from data_prep import records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    release = synthetic.write_release(root / "release", {"train": 20, "val": 6, "test": 7})
    return synthetic.build_shards(release, root / "shards")


def table(split, n, width=2, start=0):
    rows = np.arange(start, start + n, dtype=np.int64)
    labels = np.stack([rows % 2, rows % 3 == 0], axis=1).astype(np.float32)
    return types.SimpleNamespace(shard_split=split, record_index=rows, labels=labels[:, :width])


def test_train_image_crop_scale_flip_and_normalisation():
    rng = np.random.default_rng(0)
    image = np.tile(np.arange(80, dtype=np.uint8)[None, :] * 3, (60, 1))  # horizontal ramp
    t = classification.TrainTransform(image_size=32, flip_p=1.0)
    x = classification.train_image(image, rng, t)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    # every crop is flipped: the ramp now decreases left to right; channels are equal before Normalize
    gray = x[..., 0] * preprocess.IMAGENET_STD[0] + preprocess.IMAGENET_MEAN[0]
    assert gray[:, 0].mean() > gray[:, -1].mean()
    assert gray.min() == pytest.approx(0.0, abs=1e-6) and gray.max() == pytest.approx(1.0, abs=1e-6)  # min-max
    # without min-max the values keep the ramp's range (a crop of at least 75% of the area)
    raw = classification.train_image(image, np.random.default_rng(0), classification.TrainTransform(32, minmax=False))
    g = raw[..., 0] * preprocess.IMAGENET_STD[0] + preprocess.IMAGENET_MEAN[0]
    assert 0.0 <= g.min() < g.max() <= 237 / 255 + 1e-6


def test_train_boxes_follow_the_classification_scale():
    rng = np.random.default_rng(1)
    areas = []
    for _ in range(400):
        _, _, h, w = augment.random_resized_crop_box(rng, 100, 100, (0.75, 1.0))
        areas.append(h * w / 1e4)
    assert 0.70 < min(areas) and max(areas) <= 1.0  # rounding of the sides moves the area a little


def test_constant_crop_does_not_divide_by_zero():
    x = classification.train_image(
        np.full((40, 40), 7, np.uint8), np.random.default_rng(0), classification.TrainTransform(16)
    )
    # Nothing to stretch: every pixel keeps its value 7 / 255, ImageNet-normalised per channel.
    want = (7 / 255 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
    np.testing.assert_allclose(x, np.broadcast_to(want, (16, 16, 3)), rtol=1e-6)


def test_rot90_rotates_some_crops():
    image = np.zeros((64, 64), np.uint8)
    image[:, :8] = 255  # a bright left edge
    t = classification.TrainTransform(image_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, rot90_p=1.0)
    x = classification.train_image(image, np.random.default_rng(3), t)[..., 0]
    assert x[:, :4].mean() < x.max() - 1e-3  # the edge moved off the left side


def test_train_batches_are_deterministic_labelled_and_resume_exactly(dataset):
    recs = classification.LabelledRecords([dataset], [table("train", 20)])
    t = classification.TrainTransform(image_size=32)
    ds = classification.train_batches(recs, t, batch_size=4, seed=5)
    first = [ds[i] for i in range(7)]  # crosses the epoch boundary (5 batches per epoch)
    again = classification.train_batches(recs, t, batch_size=4, seed=5)[3:7]
    for a, b in zip(first[3:], again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["row"], b["row"])
    epoch = np.concatenate([b["row"] for b in first[:5]])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch sees every row once
    for b in first:
        np.testing.assert_array_equal(b["labels"], recs.labels[b["row"]])
    other = classification.train_batches(recs, t, batch_size=4, seed=6)[0]
    assert not np.array_equal(other["row"], first[0]["row"])


def test_two_data_shards_split_each_global_batch(dataset):
    recs = classification.LabelledRecords([dataset], [table("train", 20)])
    t = classification.TrainTransform(image_size=32)
    a = classification.train_batches(recs, t, batch_size=2, seed=0, shard_index=0, shard_count=2)
    b = classification.train_batches(recs, t, batch_size=2, seed=0, shard_index=1, shard_count=2)
    rows = np.concatenate([np.concatenate([a[i]["row"], b[i]["row"]]) for i in range(5)])
    assert sorted(rows.tolist()) == list(range(20))


def test_eval_batches_pad_and_match_the_reference_preprocessing(dataset):
    recs = classification.LabelledRecords([dataset], [table("val", 6), table("test", 3, start=2)])
    batches = list(classification.eval_batches(recs, 32, batch_size=4))
    assert len(batches) == 3  # 9 rows -> padded to 12
    rows = np.concatenate([b["row"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert rows[valid].tolist() == list(range(9)) and (rows[~valid] == -1).all()
    # row 7 is test record 3: decode it independently and preprocess as the official notebook
    from chexfound_jax.data.pipeline import ShardedSource

    rec = records.decode_record(ShardedSource([dataset], "test")[3])
    want = preprocess.preprocess_image(Image.fromarray(augment.to_uint8(rec["image"])).convert("RGB"), 32, 32)
    got = np.concatenate([b["image"] for b in batches])[7]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[7], recs.labels[7])


def test_tables_must_agree_on_the_class_count(dataset):
    with pytest.raises(ValueError, match="class counts"):
        classification.LabelledRecords([dataset], [table("val", 6), table("test", 3, width=1)])


def test_num_batches_is_ceil():
    assert classification.num_batches(10, 4) == 3 and classification.num_batches(8, 4) == 2
