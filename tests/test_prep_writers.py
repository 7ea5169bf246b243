"""data_prep records and shard writers: bit-exact round trips, tfds/grain readability, atomic shards."""

import os
import pickle
import struct
import subprocess
import sys
import textwrap

import google_crc32c
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from data_prep import decode, quality, records, stages, writers

NAME = "prep_writers_test"  # not a registered tfds name, so tfds reads it from data_dir
LABELS = ["Atelectasis", "Cardiomegaly", "Effusion"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RADIOGRAPH = os.path.join(REPO, "tests", "data", "images", "cxr_png_gray8_512_nih_cxr14_00000001_000.png")


def make_example(i: int, dtype=np.uint8) -> dict:
    rng = np.random.default_rng(i)
    hi = 255 if dtype == np.uint8 else 4095
    h, w = 5 + i % 4, 7 + i % 3  # shapes differ between records
    return {
        "image": rng.integers(0, hi, (h, w), endpoint=True).astype(dtype),
        "source": "toy-cxr",
        "path": f"files/p{i:02d}/s{i}/ímage_{i}.dcm",  # non-ASCII survives
        "patient_id": f"p{i // 2}",
        "study_id": f"s{i}",
        "image_id": f"img{i:03d}",
        "view_position": ["PA", "AP", ""][i % 3],
        "photometric": "MONOCHROME2" if i % 2 else "MONOCHROME1",
        "bits_stored": 8 if dtype == np.uint8 else 12,
        "original_height": 2 * h,
        "original_width": 2 * w,
        "pixel_spacing": [0.139, 0.143] if i % 2 else [],
        "split": "train" if i % 4 else "",
        "labels": [np.nan, -1.0, float(i % 2)],
    }


def assert_same(got: dict, want: dict) -> None:
    assert records.records_equal(got, records.normalize_record(want)), (got, want)


def png_bit_depth(png: bytes) -> int:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return png[24]


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected 0x82F63B78): independent of google_crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_reference(data: bytes) -> int:
    crc = crc32c_reference(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def parse_tfrecord_file(raw: bytes) -> list[bytes]:
    """Reads TFRecord framing from scratch, checking both CRCs with the reference CRC."""
    out, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        assert struct.unpack_from("<I", raw, pos + 8)[0] == masked_reference(raw[pos : pos + 8])
        data = raw[pos + 12 : pos + 12 + length]
        assert struct.unpack_from("<I", raw, pos + 12 + length)[0] == masked_reference(data)
        out.append(data)
        pos += 12 + length + 4
    assert pos == len(raw)
    return out


def write_toy_dataset(output, n: int, num_shards: int, file_format: str, dtype=np.uint8):
    ds_dir = writers.dataset_dir(output, NAME, "1.2.0")
    examples = [make_example(i, dtype) for i in range(n)]
    info = writers.write_split(
        examples, records.encode_record, ds_dir=ds_dir, split="train", num_shards=num_shards, file_format=file_format
    )
    test_examples = [make_example(100 + i, dtype) for i in range(3)]
    writers.write_split(
        test_examples, records.encode_record, ds_dir=ds_dir, split="test", num_shards=1, file_format=file_format
    )
    writers.write_dataset_info(
        ds_dir,
        features=records.record_features(dtype),
        label_names=LABELS,
        shard_lengths={"train": [info[s].num_records for s in range(num_shards)]},  # "test" is counted
        description="toy chest X-rays",
    )
    return ds_dir, examples, test_examples


def round_robin(items: list, num_shards: int) -> list:
    """The order a reader sees: shard 0's items, then shard 1's..., item k in shard k % num_shards."""
    return [x for s in range(num_shards) for x in items[s::num_shards]]


# --- records ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_record_round_trip_is_bit_exact(dtype):
    for i in range(4):
        ex = make_example(i, dtype)
        data = records.encode_record(ex)
        got = records.decode_record(data)
        assert_same(got, ex)
        assert got["image"].dtype == dtype and got["image"].shape == ex["image"].shape
        assert got["sha256"] == records.pixel_sha256(ex["image"]) == quality.pixel_sha256(ex["image"])
        assert np.isnan(got["labels"][0]) and got["labels"][1] == -1
        assert records.encode_record(got) == data  # deterministic, and decode is a true inverse
        png = tf_example_pb2.Example.FromString(data).features.feature["image"].bytes_list.value[0]
        assert png_bit_depth(png) == (8 if dtype == np.uint8 else 16)


def test_uint16_with_small_values_stays_16_bit():
    ex = make_example(0, np.uint16)
    ex["image"] = np.arange(35, dtype=np.uint16).reshape(5, 7)  # all < 256
    got = records.decode_record(records.encode_record(ex))
    assert got["image"].dtype == np.uint16
    assert_same(got, ex)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_stored_png_is_uncompressed_and_holds_the_same_pixels(dtype):
    """png_compression="stored" writes the rows as they are, larger than "deflate", with the same pixels."""
    image, _ = decode.convert_file(RADIOGRAPH, size=128, dtype=np.dtype(dtype).name)
    ex = {**make_example(0, dtype), "image": image}
    stored, deflated = (records.encode_record(ex, png_compression=c) for c in ("stored", "deflate"))
    raw = image.nbytes + image.shape[0]  # the pixels plus one filter byte per row
    assert len(deflated) < raw < len(stored)
    assert raw < len(records.encode_png(image, "stored")) < raw + 100  # PNG and zlib framing only
    for data in (stored, deflated):
        assert_same(records.decode_record(data), ex)
    with pytest.raises(ValueError, match="png_compression"):
        stages.PrepOptions(png_compression="fast")


def test_record_accepts_hwc_and_none_and_checks_input():
    ex = make_example(1)
    ex["image"] = ex["image"][..., None]
    assert_same(records.decode_record(records.encode_record(ex)), make_example(1))
    ex = {**make_example(1), "patient_id": None, "pixel_spacing": None}  # tags missing from a header
    got = records.decode_record(records.encode_record(ex))
    assert got["patient_id"] == "" and got["pixel_spacing"].shape == (0,)
    bad = [
        {"sha256": "0" * 64},  # a digest that does not match the pixels
        {"image": np.zeros((4, 4, 3), np.uint8)},
        {"image": np.zeros((4, 4), np.int32)},
        {"pixel_spacing": [0.1, 0.2, 0.3]},
        {"bits_stored": 2**40},
        {"patient_id": 7},
        {"extra_field": 1},
    ]
    for change in bad:
        with pytest.raises((ValueError, TypeError, KeyError)):
            records.encode_record({**make_example(1), **change})
    with pytest.raises(KeyError):
        records.encode_record({k: v for k, v in make_example(1).items() if k != "labels"})


def test_label_vector_uses_the_fixed_order():
    vec = records.label_vector({"Effusion": 1.0, "Atelectasis": -1.0}, LABELS)
    assert vec.dtype == np.float32
    np.testing.assert_array_equal(vec, [-1.0, np.nan, 1.0])
    with pytest.raises(KeyError):
        records.label_vector({"Fracture": 1.0}, LABELS)


# --- naming and assignment -------------------------------------------------------------------------


def test_shard_names_and_round_robin_assignment(tmp_path):
    ds_dir = writers.dataset_dir(tmp_path, NAME, "1.2.0")
    assert ds_dir == tmp_path / NAME / "1.2.0"
    names = [p.name for p in writers.shard_paths(ds_dir, "train", 3, "array_record")]
    assert names == [f"{NAME}-train.array_record-0000{i}-of-00003" for i in range(3)]
    assert writers.shard_paths(ds_dir, "val", 1, "tfrecord")[0].name == f"{NAME}-val.tfrecord-00000-of-00001"
    items = list(range(10))
    assert [writers.shard_of(k, 3) for k in items] == [k % 3 for k in items]
    assert list(writers.shard_items(items, 1, 3)) == [1, 4, 7]
    for bad in ("Bad-Name", "9lives"):
        with pytest.raises(ValueError):
            writers.dataset_dir(tmp_path, bad)


def test_disjoint_shard_sets_equal_one_run(tmp_path):
    """Workers that each write some shards produce exactly what one writer produces."""
    data = [records.encode_record(make_example(i)) for i in range(7)]
    one = writers.dataset_dir(tmp_path / "one", NAME)
    split = dict(split="train", num_shards=3, file_format="array_record")
    writers.write_split(data, lambda r: r, ds_dir=one, **split)
    two = writers.dataset_dir(tmp_path / "two", NAME)
    writers.write_split(data, lambda r: r, ds_dir=two, shards=[2], **split)
    writers.write_split(data, lambda r: r, ds_dir=two, shards=[0, 1], **split)
    for a, b in zip(writers.shard_paths(one, **split), writers.shard_paths(two, **split), strict=True):
        assert a.read_bytes() == b.read_bytes()


# --- ArrayRecord -----------------------------------------------------------------------------------


def test_array_record_reads_back_through_tfds_and_grain(tmp_path):
    ds_dir, examples, test_examples = write_toy_dataset(tmp_path, n=10, num_shards=3, file_format="array_record")
    want = round_robin(examples, 3)

    builder = tfds.builder_from_directory(ds_dir)
    assert builder.info.splits["train"].shard_lengths == [4, 3, 3]
    assert builder.info.splits["test"].num_examples == 3
    assert list(builder.info.metadata["label_names"]) == LABELS == writers.read_label_names(ds_dir)
    assert builder.info.version == "1.2.0" and builder.info.description == "toy chest X-rays"

    by_name = tfds.data_source(NAME, split="train", data_dir=tmp_path)
    by_dir = builder.as_data_source(split="train")
    assert len(by_name) == len(by_dir) == len(want)
    for i, ex in enumerate(want):
        for source in (by_name, by_dir):  # tfds' own decoding: (H, W, 1) image, text as bytes
            got = source[i]
            np.testing.assert_array_equal(got["image"][..., 0], ex["image"])
            assert got["image"].dtype == np.uint8
            assert got["path"].decode() == ex["path"] and got["bits_stored"] == ex["bits_stored"]
            np.testing.assert_array_equal(got["labels"], np.float32(ex["labels"]))
            np.testing.assert_array_equal(got["pixel_spacing"], np.float32(ex["pixel_spacing"]))

    paths = [os.fspath(p) for p in writers.shard_paths(ds_dir, "train", 3, "array_record")]
    source = grain.sources.ArrayRecordDataSource(paths)
    got = list(grain.MapDataset.source(source).map(records.decode_record))
    assert len(got) == len(want)
    for g, ex in zip(got, want, strict=True):
        assert_same(g, ex)
    test_source = builder.as_data_source(split="test", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    for i, ex in enumerate(test_examples):
        assert_same(records.decode_record(test_source[i]), ex)
    assert not (ds_dir / writers.INCOMPLETE_DIR).exists()


def test_uint16_array_record_through_tfds_raw_bytes(tmp_path):
    """tfds' NumPy image decoder needs OpenCV for 16-bit PNGs; raw bytes + decode_record need neither."""
    ds_dir, examples, _ = write_toy_dataset(tmp_path, n=5, num_shards=2, file_format="array_record", dtype=np.uint16)
    builder = tfds.builder_from_directory(ds_dir)
    assert builder.info.features["image"].np_dtype == np.uint16
    raw = tfds.data_source(
        NAME, split="train", data_dir=tmp_path, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    for i, ex in enumerate(round_robin(examples, 2)):
        assert_same(records.decode_record(raw[i]), ex)
    skip = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    assert records.decode_png(skip[0]["image"]).dtype == np.uint16


# --- TFRecord --------------------------------------------------------------------------------------


def test_masked_crc32c_matches_reference():
    assert google_crc32c.value(b"123456789") == crc32c_reference(b"123456789") == 0xE3069283
    for data in (b"", b"x", bytes(range(256))):
        assert writers.masked_crc32c(data) == masked_reference(data)


def test_tfrecord_shards_read_back_and_framing_is_standard(tmp_path):
    ds_dir, examples, _ = write_toy_dataset(tmp_path, n=10, num_shards=3, file_format="tfrecord", dtype=np.uint16)
    want = round_robin(examples, 3)
    paths = writers.shard_paths(ds_dir, "train", 3, "tfrecord")

    independent = [rec for p in paths for rec in parse_tfrecord_file(p.read_bytes())]
    assert independent == [records.encode_record(ex) for ex in want]

    source = writers.TFRecordDataSource(paths)
    assert len(source) == 10
    got = list(grain.MapDataset.source(source).map(records.decode_record))
    for g, ex in zip(got, want, strict=True):
        assert_same(g, ex)
    threaded = grain.MapDataset.source(source).map(records.decode_record).to_iter_dataset(grain.ReadOptions(4, 8))
    assert [g["image_id"] for g in threaded] == [ex["image_id"] for ex in want]
    shuffled = grain.MapDataset.source(pickle.loads(pickle.dumps(source))).shuffle(seed=3).map(records.decode_record)
    assert sorted(g["image_id"] for g in shuffled) == sorted(ex["image_id"] for ex in want)
    with pytest.raises(IndexError):
        source[10]

    builder = tfds.builder_from_directory(ds_dir)
    assert builder.info.file_format.value == "tfrecord"
    assert builder.info.splits["train"].shard_lengths == [4, 3, 3]


def test_tfrecord_corruption_is_detected(tmp_path):
    path = tmp_path / f"{NAME}-train.tfrecord-00000-of-00001"
    with writers.ShardWriter(path) as w:
        for i in range(3):
            w.write(records.encode_record(make_example(i)))
    raw = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.tfrecord"
    raw[40] ^= 1  # inside record 0's data
    flipped.write_bytes(bytes(raw))
    source = writers.TFRecordDataSource(flipped)
    with pytest.raises(ValueError, match="corrupt"):
        source[0]
    assert writers.TFRecordDataSource(flipped, verify_crc=False)[1] == writers.TFRecordDataSource(path)[1]
    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        writers.TFRecordDataSource(truncated)


# --- interrupted writers ---------------------------------------------------------------------------


def _finished_files(ds_dir) -> list[str]:
    return sorted(p.name for p in ds_dir.iterdir() if p.is_file())


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_interrupted_shard_is_never_visible_and_rerun_is_identical(tmp_path, file_format):
    data = [records.encode_record(make_example(i)) for i in range(9)]
    split = dict(split="train", num_shards=3, file_format=file_format)
    fresh = writers.dataset_dir(tmp_path / "fresh", NAME)
    writers.write_split(data, lambda r: r, ds_dir=fresh, **split)

    ds_dir = writers.dataset_dir(tmp_path / "crash", NAME)
    paths = writers.shard_paths(ds_dir, **split)

    def fail_on_item_4(record: bytes) -> bytes:  # item 4 is shard 1's second record
        if record == data[4]:
            raise RuntimeError("simulated crash")
        return record

    with pytest.raises(RuntimeError, match="simulated crash"):
        writers.write_split(data, fail_on_item_4, ds_dir=ds_dir, **split)
    assert _finished_files(ds_dir) == [paths[0].name]  # shard 0 finished; shard 1 discarded, not half-written
    assert list((ds_dir / writers.INCOMPLETE_DIR).iterdir()) == []
    with pytest.raises(ValueError, match="unfinished"):
        writers.write_dataset_info(ds_dir, features=records.record_features())

    info = writers.write_split(data, lambda r: r, ds_dir=ds_dir, **split)  # resumes: shard 0 is kept
    assert [info[s].num_records for s in range(3)] == [3, 3, 3]
    for a, b in zip(writers.shard_paths(fresh, **split), paths, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_killed_writer_leaves_only_staging_and_resume_is_identical(tmp_path):
    """A process that dies mid-shard (no cleanup at all) leaves nothing under a shard name."""
    data = [records.encode_record(make_example(i)) for i in range(6)]
    (tmp_path / "data.pkl").write_bytes(pickle.dumps(data))
    ds_dir = writers.dataset_dir(tmp_path / "out", NAME)
    script = textwrap.dedent(
        f"""
        import os, pickle
        from data_prep import writers
        data = pickle.loads(open({os.fspath(tmp_path / "data.pkl")!r}, "rb").read())
        def die_on_item_3(record):
            if record == data[3]:
                os._exit(3)
            return record
        writers.write_split(data, die_on_item_3, ds_dir={os.fspath(ds_dir)!r}, split="train", num_shards=2)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode == 3
    paths = writers.shard_paths(ds_dir, "train", 2, "array_record")
    assert _finished_files(ds_dir) == [paths[0].name]
    assert len(list((ds_dir / writers.INCOMPLETE_DIR).iterdir())) == 1  # the dead writer's staging file

    writers.write_split(data, lambda r: r, ds_dir=ds_dir, split="train", num_shards=2)
    writers.cleanup_incomplete(ds_dir)
    writers.write_dataset_info(ds_dir, features=records.record_features(), label_names=LABELS)
    fresh = writers.dataset_dir(tmp_path / "fresh", NAME)
    writers.write_split(data, lambda r: r, ds_dir=fresh, split="train", num_shards=2)
    for a, b in zip(writers.shard_paths(fresh, "train", 2, "array_record"), paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert tfds.builder_from_directory(ds_dir).info.splits["train"].shard_lengths == [3, 3]


def test_remote_path_branch_stages_locally_then_copies(tmp_path, monkeypatch):
    """The gs:// code path (local temp file, copy to staging, rename), exercised on a local directory."""
    data = [records.encode_record(make_example(i)) for i in range(5)]
    split = dict(split="train", num_shards=2, file_format="tfrecord")
    local = writers.dataset_dir(tmp_path / "local", NAME)
    writers.write_split(data, lambda r: r, ds_dir=local, **split)
    monkeypatch.setattr(writers, "_is_local", lambda path: False)
    remote = writers.dataset_dir(tmp_path / "remote", NAME)
    info = writers.write_split(data, lambda r: r, ds_dir=remote, **split)
    assert [info[s].num_records for s in range(2)] == [3, 2]
    for a, b in zip(writers.shard_paths(local, **split), writers.shard_paths(remote, **split), strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert list((remote / writers.INCOMPLETE_DIR).iterdir()) == []
