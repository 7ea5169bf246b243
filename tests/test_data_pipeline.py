"""grain input pipelines on real data_prep shards: determinism, exact resume, process sharding, layouts."""

import json
import os
import pathlib
import sys

import grain
import jax
import numpy as np
import portpicker
import pytest
from etils import epath
from helpers import run_processes

from chexfound_jax.data import augment, batch_layout, collate, pipeline
from chexfound_jax.ssl import masking
from configs.pretrain import tiny_cpu
from data_prep import local_runner, records, writers
from data_prep import stages as prep
from data_prep.sources import get_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERMANY = os.path.join(REPO, "tests", "data", "kermany")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> epath.Path:
    """The 24 bundled Kermany X-rays as a data_prep dataset (96 px shorter side, 5 shards)."""
    out = tmp_path_factory.mktemp("shards")
    source = get_source(
        "folder", KERMANY, csv="labels.csv", path_column="file", label_columns=["label"], source_name="kermany"
    )
    options = prep.PrepOptions(size=96, min_size=200, records_per_shard=5)
    local_runner.run_local(source, out, options, workers=1, progress=False)
    return writers.dataset_dir(out, "kermany", prep.DATASET_VERSION)


def config(dataset, **data):
    cfg = tiny_cpu.get_config()
    cfg.train.update(global_batch_size=8, batch_groups=4)
    cfg.data.update(datasets=(os.fspath(dataset),), **data)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_batch_layout_and_dtypes(dataset):
    cfg = config(dataset)
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    batch = next(iter(pipeline.training_dataset(cfg, layout, process_index=0)))
    b, g, s, n_local = 2, 64, 32, 2
    assert batch["global_crops"].shape == (4, 2 * b, g, g) and batch["global_crops"].dtype == np.uint8
    assert batch["local_crops"].shape == (4, n_local * b, s, s) and batch["local_crops"].dtype == np.uint8
    spec = batch_layout.batch_spec(cfg, 4)
    for k in ("masks", "mask_indices", "mask_weights", "mask_valid"):
        assert batch[k].shape == spec[k].shape and batch[k].dtype == spec[k].dtype, k
    assert batch["skipped"].shape == (4,) and not batch["skipped"].any()
    # iBOT bookkeeping is consistent per group: indices point at masked tokens, weights 1/count.
    for grp in range(4):
        valid = batch["mask_valid"][grp]
        flat = batch["masks"][grp].reshape(-1)
        assert valid.sum() == flat.sum()
        assert flat[batch["mask_indices"][grp][valid]].all()
    finished = jax.jit(lambda x: pipeline.finish_on_device(x, cfg))(batch)
    assert finished.keys() == set(batch_layout.BATCH_KEYS)
    for k in batch_layout.BATCH_KEYS:
        assert finished[k].shape == spec[k].shape and finished[k].dtype == spec[k].dtype, k
    # Host photometry gives the train step's float crops directly.
    host = next(iter(pipeline.training_dataset(config(dataset, photometric="host"), layout, process_index=0)))
    assert host["global_crops"].shape == spec["global_crops"].shape and host["global_crops"].dtype == np.float32


def test_ibot_blocks_are_capped_as_the_official_train_py(dataset, monkeypatch):
    """Official train.py caps each mask block at `0.5 * size // patch * size // patch` patches: 10 at 80 px
    and patch 16 (and 210 at 336), not half the grid (12.5, 220.5)."""
    seen, real = [], masking.collate_masks

    def spy(rng, n, grid, **kwargs):
        if grid == (5, 5):  # this test's batches (other tests' pipelines may still be prefetching)
            seen.append(kwargs["max_num_patches"])
        return real(rng, n, grid, **kwargs)

    monkeypatch.setattr(masking, "collate_masks", spy)
    cfg = config(dataset)
    cfg.crops.global_crops_size = 80
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    next(iter(pipeline.training_dataset(cfg, layout, process_index=0)))
    assert len(seen) >= 4 and set(seen) == {10.0}  # every group of the batch (and those prefetched)
    seen.clear()
    collate.collate(np.zeros((1, 4, 80, 80, 3)), np.zeros((1, 8, 32, 32, 3)), np.random.default_rng(0), cfg)
    assert seen == [10.0]


def test_crop_major_layout_matches_the_official_collate():
    per_image = np.arange(3 * 2).reshape(3, 2)  # 3 images x 2 crops: value 2 * image + crop
    assert pipeline._crop_major(per_image).tolist() == [0, 2, 4, 1, 3, 5]  # crop 0 of every image, then crop 1


def test_same_seed_same_batches_and_resume_is_exact(dataset):
    cfg = config(dataset)
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    first = take(iter(pipeline.training_dataset(cfg, layout, process_index=0)), 5)
    again = iter(pipeline.training_dataset(cfg, layout, process_index=0))
    assert_batches_equal(take(again, 5), first)
    other = next(iter(pipeline.training_dataset(config(dataset, seed=1), layout, process_index=0)))
    assert not np.array_equal(other["global_crops"], first[0]["global_crops"])

    it = iter(pipeline.training_dataset(cfg, layout, process_index=0))
    take(it, 2)
    state = it.get_state()
    resumed = iter(pipeline.training_dataset(cfg, layout, process_index=0))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), first[2:5])  # crosses the epoch boundary (24 records, 8 per batch)


def test_resume_with_worker_processes(dataset):
    cfg = config(dataset, num_workers=2)
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    single = take(iter(pipeline.training_dataset(cfg, layout, process_index=0, num_workers=0)), 4)
    it = iter(pipeline.training_dataset(cfg, layout, process_index=0))
    assert_batches_equal(take(it, 2), single[:2])  # workers do not change the batches
    state = it.get_state()
    resumed = iter(pipeline.training_dataset(cfg, layout, process_index=0))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), single[2:4])


def test_processes_read_disjoint_records_covering_each_epoch():
    n, procs = 23, 3
    orders = [pipeline.record_order(n, 7, p, procs) for p in range(procs)]
    per_epoch = [-(-(n - p) // procs) for p in range(procs)]
    for epoch in range(2):
        seen = [[int(o[epoch * k + i]) for i in range(k)] for o, k in zip(orders, per_epoch, strict=True)]
        flat = [r for s in seen for r in s]
        assert sorted(flat) == list(range(n)), epoch  # disjoint and covering
    assert [int(orders[0][i]) for i in range(per_epoch[0])] != [
        int(orders[0][per_epoch[0] + i]) for i in range(per_epoch[0])
    ]  # reshuffled per epoch


def test_global_arrays_on_eight_devices(dataset):
    from chexfound_jax.train.setup import build_training

    cfg = config(dataset)
    training = build_training(cfg, {"data": 4, "fsdp": 2}, "fsdp")
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    ds = pipeline.training_dataset(cfg, layout, process_index=0)
    local = next(iter(ds))
    shardings = pipeline.data_shardings(local, training.batch_shardings["global_crops"])
    assert pipeline.process_data_shard(shardings["global_crops"], 4) == (0, 1)
    it = pipeline.DeviceIterator(ds, shardings, layout.groups)
    batch, local_again = next(it)
    assert_batches_equal([local_again], [local])
    for k, v in batch.items():
        assert v.shape == local[k].shape and v.sharding == shardings[k], k
        assert len(v.addressable_shards) == 8
    finished = jax.jit(lambda x: pipeline.finish_on_device(x, cfg))(batch)
    assert finished["global_crops"].shape == training.batch_spec["global_crops"].shape
    # The prefetching thread reads ahead, but the state is the position after what was returned.
    next(it)
    state = it.get_state()
    third, _ = next(it)
    it.set_state(state)
    again, _ = next(it)
    np.testing.assert_array_equal(np.asarray(again["global_crops"]), np.asarray(third["global_crops"]))
    it.close()


def bad_dataset(tmp_path, good: epath.Path) -> epath.Path:
    """A copy of `good` whose record 3 (round robin: shard 3, record 0) is garbage."""
    files = pipeline.shard_files(good, "train")
    src = pipeline.ShardedSource([good], "train")
    data = [src[i] for i in range(len(src))]
    data[3] = b"not a record"
    ds_dir = writers.dataset_dir(tmp_path, "broken")
    writers.write_split(data, lambda r: r, ds_dir=ds_dir, split="train", num_shards=len(files))
    writers.write_dataset_info(ds_dir, features=records.record_features())
    return ds_dir


def test_bad_record_is_named_or_skipped_and_counted(dataset, tmp_path):
    broken = bad_dataset(tmp_path, dataset)
    cfg = config(broken)
    layout = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    with pytest.raises(pipeline.BadRecordError, match=r"broken-train\.array_record-00003-of-00005 record 0"):
        take(iter(pipeline.training_dataset(cfg, layout, process_index=0)), 3)  # one epoch reads every record
    skipping = iter(pipeline.training_dataset(config(broken, skip_bad_records=True), layout, process_index=0))
    batches = take(skipping, 3)
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    assert all(b["global_crops"].shape == batches[0]["global_crops"].shape for b in batches)


def test_augment_config_follows_the_config(dataset):
    cfg = config(dataset)
    aug = augment.AugmentConfig.from_config(cfg)
    assert (aug.global_crops_size, aug.local_crops_size, aug.local_crops_number) == (64, 32, 2)


def test_two_processes_read_disjoint_halves_onto_one_mesh(dataset, tmp_path):
    """Two local processes x 4 CPU devices: each reads its own records, batches land on the 8-device mesh."""
    port = portpicker.pick_unused_port()
    worker = pathlib.Path(__file__).parent / "multihost_data_worker.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    run_processes(
        [[sys.executable, str(worker), str(i), str(port), os.fspath(dataset), str(outs[i])] for i in range(2)], env
    )
    reports = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["data_shard"] for r in reports) == [[0, 2], [1, 2]]
    a, b = (set(r["records"][:12]) for r in reports)  # each process's first epoch: 12 of the 24 records
    assert len(a) == 12 and not a & b and a | b == set(range(24))
    cfg = config(dataset)
    cfg.train.update(global_batch_size=16, batch_groups=8)
    spec = batch_layout.batch_spec(cfg, 8)
    for r in reports:
        assert r["shapes"] == {k: list(v.shape) for k, v in spec.items()}
        assert r["local_shapes"]["global_crops"] == [4, 4, 64, 64]  # half of the 8 groups, uint8 gray
        assert r["addressable"] == 4
    assert reports[0]["checksums"] == reports[1]["checksums"]  # one global array, reduced over both processes


def test_restore_onto_another_process_count_continues_the_epoch(dataset):
    """A state saved by 2 data shards restores onto 1: the records not yet read in the epoch, exactly."""
    cfg = config(dataset)
    two = pipeline.train_layout(cfg, num_batch_shards=4, process_count=2)
    its = [iter(pipeline.training_dataset(cfg, two, process_index=p)) for p in (0, 1)]
    first_step = [int(r) for it in its for r in next(it)["record_index"].ravel()]
    states = [it.get_state() for it in its]
    assert states[0] == states[1]  # the position is the global step, the same on every process
    one = pipeline.train_layout(cfg, num_batch_shards=4, process_count=1)
    resumed = iter(pipeline.training_dataset(cfg, one, process_index=0))
    resumed.set_state(states[0])
    rest = [int(r) for b in take(resumed, 2) for r in b["record_index"].ravel()]
    assert sorted(first_step + rest) == list(range(24))  # 8 read before, 16 after: the epoch, once each


def test_a_stalled_pipeline_is_reported(caplog):
    """No batch within the timeout: a warning saying how long, and the batch is still delivered."""
    import time as time_lib

    def slow(i):
        time_lib.sleep(0.6)
        return {"x": np.full((2, 3), i, np.float32)}

    ds = grain.MapDataset.range(4).map(slow).to_iter_dataset()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    it = pipeline.DeviceIterator(ds, {"x": sharding}, groups=2, buffer=1, stall_timeout_s=0.2)
    with caplog.at_level("WARNING"):
        batch, _ = next(it)
    it.close()
    assert np.asarray(batch["x"]).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert any("input pipeline stalled" in r.getMessage() for r in caplog.records)
