"""data_prep.build: counts that reconcile, deterministic shards, crash resume, cross-source dedup, Beam == local."""

import csv
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import local_runner, records, stages, writers
from data_prep.sources import get_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
SIZE = 96
OPTIONS = stages.PrepOptions(size=SIZE, min_size=200, records_per_shard=7)
DICOMS = {  # file under tests/data/dicom -> expected reason (None: converted)
    "chest/derived_cxr_cr_mono1_10bit_explicitLE_part10_from_CR-MONO1-10-chest.dcm": None,
    "corrupt/corrupt_mr_pixeldata_truncated.dcm": "truncated",
    "corrupt/corrupt_rtplan_truncated_no_pixeldata.dcm": "no_pixel_data",
    "negative/neg_mr_small_64px_explicitLE.dcm": "modality",
    "negative/neg_cr_cspine_lat_mono1_12bit_16x16_rescale_OD_pydicom_CR1.dcm": "body_part",
}
COLUMNS = ["file", "label", "split", "patient_id", "view"]


def make_release(root, kermany_rows=slice(None), extra=True) -> str:
    """A folder release: Kermany PNGs (labelled, split by patient) plus one of every failure mode."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(DATA, "kermany", "labels.csv"), newline="") as f:
        kermany = list(csv.DictReader(f))[kermany_rows]
    rows = []
    for i, r in enumerate(kermany):
        shutil.copy(os.path.join(DATA, "kermany", r["file"]), os.path.join(root, r["file"]))
        rows.append([r["file"], r["label"], "test" if i % 4 == 3 else "train", r["patient_id"], "PA"])
    if extra:
        first = os.path.join(DATA, "kermany", kermany[0]["file"])
        img = np.asarray(Image.open(first))
        shutil.copy(first, os.path.join(root, "images", "zz_exact_copy.png"))
        Image.fromarray(img).save(os.path.join(root, "images", "zz_near_copy.jpg"), quality=90)
        Image.fromarray(img).save(os.path.join(root, "images", "lateral.png"))
        data = open(first, "rb").read()
        open(os.path.join(root, "images", "truncated.png"), "wb").write(data[: len(data) // 3])
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (300, 300), dtype=np.uint8)
        Image.fromarray(noise).save(os.path.join(root, "images", "noise.png"))
        Image.fromarray(img[:100, :100]).save(os.path.join(root, "images", "small.png"))
        for name in ("zz_exact_copy.png", "zz_near_copy.jpg", "truncated.png", "noise.png", "small.png"):
            rows.append([f"images/{name}", "", "train", "", ""])
        rows.append(["images/lateral.png", "1", "train", "x", "LL"])
        rows.append(["images/never_downloaded.png", "0", "train", "y", "PA"])
        for rel in DICOMS:
            dst = os.path.join(root, "dicom", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(os.path.join(DATA, "dicom", rel), dst)
            rows.append([f"dicom/{rel}", "", "train", "", ""])
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return root


SOURCE_OPTIONS = {
    "csv": "labels.csv",
    "path_column": "file",
    "label_columns": ["label"],
    "split_column": "split",
    "patient_column": "patient_id",
    "view_column": "view",
    "source_name": "kermany",
}


def source(root, **kw):
    return get_source("folder", root, views="frontal", **SOURCE_OPTIONS | kw)


def build(root, out, **kw):
    kw = {"workers": 1, "progress": False} | kw
    return local_runner.run_local(source(root), out, kw.pop("options", OPTIONS), **kw)


def shard_bytes(ds_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ds_dir.iterdir()) if "-of-" in p.name}


def ds(out, name="kermany"):
    return writers.dataset_dir(out, name, stages.DATASET_VERSION)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(str(tmp_path_factory.mktemp("release")))


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    info = build(release, out)
    return out, info


def test_counts_reasons_and_failures_reconcile(built):
    out, info = built
    c = info["counts"]
    rejected = {"truncated": 2, "noise": 1, "too_small": 1, "no_pixel_data": 1, "modality": 1, "body_part": 1}
    assert c == {
        "listed": 24 + 5 + 2 + len(DICOMS),
        "view_filtered": 1,
        "missing": 1,
        "seen": 24 + 5 + len(DICOMS),
        "written": 25,
        "duplicate": 1,
        "near_duplicate": 1,
        "failed": 0,
        "rejected": dict(sorted(rejected.items())),
    }
    assert stages.reconcile(c) == []
    with open(ds(out) / "failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    by_path = {r["path"]: r["reason"] for r in failures}
    assert len(failures) == c["missing"] + c["seen"] - c["written"]
    assert by_path["images/never_downloaded.png"] == "missing"
    assert by_path["images/zz_exact_copy.png"] == "duplicate"
    assert by_path["images/zz_near_copy.jpg"] == "near_duplicate"
    assert by_path["images/truncated.png"] == "truncated"
    assert by_path["images/noise.png"] == "noise"
    for rel, reason in DICOMS.items():
        assert by_path.get(f"dicom/{rel}") == reason
    assert all(r["message"].startswith(r["path"]) for r in failures)  # messages name the file, never a temp path
    manifest = json.loads((ds(out) / "manifest.json").read_text())
    assert manifest["counts"] == c and manifest["options"] == OPTIONS.to_json()
    assert sum(s["written"] for s in manifest["splits"].values()) == c["written"]


def test_records_carry_metadata_and_read_through_tfds(built, release):
    out, info = built
    builder = tfds.builder_from_directory(os.fspath(ds(out)))
    assert builder.info.metadata["label_names"] == ["label"]
    with open(os.path.join(release, "labels.csv"), newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    seen = []
    for split, meta in info["splits"].items():
        source_ds = tfds.data_source("kermany", split=split, data_dir=os.fspath(out), try_gcs=False)
        assert len(source_ds) == meta["written"]
        num_shards = meta["num_shards"]
        for path in writers.shard_paths(ds(out), split, num_shards, "array_record"):
            assert writers.count_records(path) in (meta["written"] // num_shards, -(-meta["written"] // num_shards))
        shard_records = grain_records(ds(out), split, num_shards)
        assert records.records_equal(records.decode_record(source_ds.data_source[0]), shard_records[0])
        paths = [rec["path"] for rec in shard_records]
        assert paths == sorted(paths)  # shards hold the kept items of a split in item (relpath) order
        for rec in shard_records:
            row = rows[rec["path"]]
            assert rec["split"] == row["split"] == split
            assert rec["patient_id"] == row["patient_id"] and rec["view_position"] in ("PA", "")
            assert np.array_equal(rec["labels"], [float(row["label"])] if row["label"] else [np.nan], equal_nan=True)
            assert min(rec["image"].shape) == SIZE and rec["image"].dtype == np.uint8
            assert rec["sha256"] == records.pixel_sha256(rec["image"])
            seen.append(rec["path"])
    assert len(set(seen)) == info["counts"]["written"]


def grain_records(ds_dir, split, num_shards):
    import grain

    paths = [os.fspath(p) for p in writers.shard_paths(ds_dir, split, num_shards, "array_record")]
    source_ds = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode_record(source_ds[i]) for i in range(len(source_ds))]


def test_shards_hold_items_in_order_and_balanced():
    assert stages.shard_bounds(10, 3) == [0, 3, 6, 10]
    assert stages.shard_bounds(2, 3) == [0, 0, 1, 2]
    assert stages.num_shards_for(15, 7) == 3 and stages.num_shards_for(0, 7) == 1
    rows = [
        {"index": i, "relpath": f"f{i}", "split": "train", "reason": None, "message": "", "sha256": f"s{i}",
         "phash": f"{h:016x}"}
        for i, h in enumerate([0, 0b111, 0b1111111111, 0b111111111111111111111, 0])
    ]  # fmt: skip
    rows[4]["sha256"] = "s0"
    plan = stages.decide(rows, "src", stages.PrepOptions(near_duplicate_bits=3, records_per_shard=1))
    reasons = [r["reason"] for r in plan.rows]
    # 1 is 3 bits from 0 (near), 2 is 10 from 0 and 7 from 1 (kept: 1 was not kept), 3 is 11 from 2, 4 = 0 exactly.
    assert reasons == [None, "near_duplicate", None, None, "duplicate"]
    assert plan.shards == {"train": [[0], [2], [3]]}
    assert "src:f0" in plan.rows[4]["message"]
    with pytest.raises(ValueError, match="0..n-1"):
        stages.decide(rows[1:], "src", OPTIONS)


def test_workers_and_chunking_do_not_change_the_shards(built, release, tmp_path):
    out, _ = built
    build(release, tmp_path, workers=2, chunk_size=3)
    assert shard_bytes(ds(tmp_path)) == shard_bytes(ds(out))
    assert (ds(tmp_path) / "failures.csv").read_text() == (ds(out) / "failures.csv").read_text()
    assert not (ds(tmp_path) / local_runner.WORK_DIR).exists()


def test_tfrecord_shards_hold_the_same_records(built, release, tmp_path):
    out, info = built
    build(release, tmp_path, options=stages.PrepOptions(**OPTIONS.to_json() | {"file_format": "tfrecord"}))
    for split, meta in info["splits"].items():
        tf_paths = writers.shard_paths(ds(tmp_path), split, meta["num_shards"], "tfrecord")
        got = writers.TFRecordDataSource(tf_paths)
        want = grain_records(ds(out), split, meta["num_shards"])
        assert len(got) == len(want)
        assert all(records.records_equal(records.decode_record(got[i]), w) for i, w in enumerate(want))


def cli(release, out, *extra):
    args = [f"--source_option={k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in SOURCE_OPTIONS.items()]
    return [
        sys.executable, "-m", "data_prep.build", "--source=folder", f"--input={release}", f"--workdir={out}",
        f"--size={SIZE}", f"--min_size={OPTIONS.min_size}", f"--records_per_shard={OPTIONS.records_per_shard}", *args,
        *extra,
    ]  # fmt: skip


def test_killed_build_resumes_to_the_same_shards(built, release, tmp_path):
    out, _ = built
    cmd = cli(release, tmp_path, "--workers=1", "--chunk_size=1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    work = ds(tmp_path) / local_runner.WORK_DIR
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("chunk-*.jsonl")) if work.exists() else []) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("chunk-*.jsonl")))
    assert 5 <= done < 36 and not (ds(tmp_path) / "manifest.json").exists(), done
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written 25" in result.stdout
    assert shard_bytes(ds(tmp_path)) == shard_bytes(ds(out))
    # Rerunning a finished build changes nothing; other options are refused rather than mixed in.
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    other = subprocess.run([*cmd, "--size=64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "other options" in other.stderr


def test_crash_during_shard_writing_resumes(built, release, tmp_path):
    out, _ = built
    build(release, tmp_path, keep_work=True)
    d = ds(tmp_path)
    (d / "manifest.json").unlink()
    victim = sorted(p for p in d.iterdir() if "-of-" in p.name)[1]
    victim.unlink()
    (d / writers.INCOMPLETE_DIR).mkdir(exist_ok=True)
    (d / writers.INCOMPLETE_DIR / f"{victim.name}.deadbeef").write_bytes(b"half a shard")
    with pytest.raises(ValueError, match="chunk_size"):  # an unfinished build with other settings is not mixed
        build(release, tmp_path, chunk_size=5)
    build(release, tmp_path)
    assert shard_bytes(d) == shard_bytes(ds(out))
    assert not (d / writers.INCOMPLETE_DIR).exists()


def recorded_before_png_compression(options, compress_level):
    """The options of a build made when --compress_level (an int) stood where --png_compression is."""
    recorded = options.to_json()
    del recorded["png_compression"]
    return recorded | {"compress_level": compress_level}


def test_a_build_recorded_with_compress_level_is_not_rebuilt(tmp_path):
    """Levels 1-9 (and -1, zlib's default) wrote the bytes of png_compression=deflate: such a build is the one
    asked for, finished or not. Level 0 (Paeth rows, stored) and another png_compression are other options."""
    d = ds(tmp_path)
    d.mkdir(parents=True)
    stored = dataclasses.replace(OPTIONS, png_compression="stored")
    for level in (6, 9, 1, -1, 0):
        manifest = {"name": "kermany", "options": recorded_before_png_compression(OPTIONS, level), "counts": {}}
        (d / stages.MANIFEST).write_text(json.dumps(manifest))
        if level:  # a rerun returns the finished build: nothing listed (there is no release), nothing written
            assert build(str(tmp_path / "no_release"), tmp_path) == manifest
        else:
            with pytest.raises(ValueError, match="other options .*use --overwrite"):
                build(str(tmp_path / "no_release"), tmp_path)
        with pytest.raises(ValueError, match="other options"):
            stages.finished_build(d, stored)
    assert sorted(p.name for p in d.iterdir()) == [stages.MANIFEST]

    # An unfinished one resumes: its build.json reads as the same settings.
    work = tmp_path / "work"
    work.mkdir()
    expected = {"source": "kermany", "options": OPTIONS.to_json(), "chunk_size": 1}
    old = expected | {"options": recorded_before_png_compression(OPTIONS, 6)}
    (work / local_runner.BUILD_JSON).write_text(json.dumps(old))
    local_runner._check_build(work, expected)
    with pytest.raises(ValueError, match="different \\['options'\\]"):
        local_runner._check_build(work, expected | {"options": stored.to_json()})


def test_cross_source_dedup(tmp_path):
    first = make_release(str(tmp_path / "a"), slice(0, 6), extra=False)
    second = make_release(str(tmp_path / "b"), slice(4, 10), extra=False)
    a = local_runner.run_local(source(first, source_name="alpha"), tmp_path / "out", OPTIONS, workers=1, progress=False)
    b = local_runner.run_local(
        source(second, source_name="beta"),
        tmp_path / "out",
        OPTIONS,
        workers=1,
        progress=False,
        dedup_against=[ds(tmp_path / "out", "alpha")],
    )
    assert a["counts"]["written"] == 6
    assert b["counts"]["written"] == 4 and b["counts"]["duplicate"] == 2
    failures = (ds(tmp_path / "out", "beta") / "failures.csv").read_text()
    assert failures.count("duplicate of alpha:images/") == 2
    hashes = list(csv.DictReader(io.StringIO((ds(tmp_path / "out", "beta") / "hashes.csv").read_text())))
    assert len(hashes) == 4 and all(h["id"].startswith("beta:") for h in hashes)
    with pytest.raises(FileNotFoundError, match="hashes.csv"):
        stages.load_hashes([tmp_path / "nowhere"])


@pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None, reason="needs Apache Beam (the [beam] extra), not installed"
)
def test_beam_direct_runner_equals_local(built, release, tmp_path):
    from data_prep import beam_runner

    out, info = built
    got = beam_runner.run_beam(source(release), tmp_path, OPTIONS, beam_args=["--runner=DirectRunner"])
    assert got["counts"] == info["counts"] and got["splits"] == info["splits"]
    assert shard_bytes(ds(tmp_path)) == shard_bytes(ds(out))
    for name in ("failures.csv", "hashes.csv", "dataset_info.json", "features.json", "metadata.json"):
        assert (ds(tmp_path) / name).read_text() == (ds(out) / name).read_text(), name


def test_a_renamed_flag_fails_naming_the_new_one():
    from absl import flags

    from data_prep import retired_flags

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Output root.", flag_values=fv)
    retired_flags.define_renamed("output", "workdir", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    fv(["prog", "--workdir=/a"])
    assert fv.workdir == "/a" and fv.output is None
    # Every spelling, with or without a value, and before the required --workdir is checked.
    for argv in (["--output=/a"], ["--output", "/a", "--workdir=/b"], ["--output"], ["--nooutput"], ["-output=/a"]):
        fv.unparse_flags()
        with pytest.raises(SystemExit) as e:
            fv(["prog", *argv])
        assert str(e.value) == "FATAL Flags parsing error: --output was renamed --workdir", argv
    with pytest.raises(ValueError, match="--nowhere"):
        retired_flags.define_renamed("elsewhere", "nowhere", flag_values=fv)


def test_build_refuses_the_old_flags_naming_the_new_ones(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.build", "--source=folder", f"--input={tmp_path}"]
    for old, line in (
        (f"--output={tmp_path}", "--output was renamed --workdir"),
        ("--compress_level=9", "--compress_level was replaced by --png_compression=deflate|stored"),
    ):
        result = subprocess.run(
            [*cmd, f"--workdir={tmp_path}", old], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1 and result.stderr.strip() == f"FATAL Flags parsing error: {line}"
    assert not any(tmp_path.iterdir())


def test_folder_views_come_from_the_dicom_headers(tmp_path):
    """A frontal build of a folder leaves out its lateral DICOMs and counts them as view-filtered, as a CSV
    source counts its lateral rows; a PNG has no view and is kept."""
    import pydicom
    from pydicom.dataset import Dataset

    root = tmp_path / "release"
    root.mkdir()
    frontal = os.path.join(DATA, "dicom", next(rel for rel, reason in DICOMS.items() if reason is None))  # a PA chest
    shutil.copy(frontal, root / "a_frontal.dcm")
    header = pydicom.dcmread(frontal)
    assert header.ViewPosition == "PA"
    header.ViewPosition = "LL"
    header.save_as(root / "b_lateral.dcm")
    del header.ViewPosition  # the view told by the View Code Sequence alone
    code = Dataset()
    code.CodeMeaning = "left lateral"
    header.ViewCodeSequence = [code]
    header.save_as(root / "c_lateral_by_code.dcm")
    shutil.copy(os.path.join(DATA, "images", "cxr_png_gray8_512_nih_cxr14_00000001_000.png"), root / "d_no_view.png")

    info = local_runner.run_local(get_source("folder", root), tmp_path / "out", OPTIONS, workers=1, progress=False)
    c = info["counts"]
    assert (c["listed"], c["view_filtered"], c["seen"], c["written"]) == (4, 2, 2, 2) and stages.reconcile(c) == []
    got = grain_records(ds(tmp_path / "out", "folder"), "train", info["splits"]["train"]["num_shards"])
    assert [(r["path"], r["view_position"]) for r in got] == [("a_frontal.dcm", "PA"), ("d_no_view.png", "")]
    assert "lateral" not in (ds(tmp_path / "out", "folder") / "failures.csv").read_text()  # as for CSV sources

    def listing(views):
        src = get_source("folder", root, views=views)
        return {i.relpath: i.view_position for i in src.items()}, src.view_filtered

    names = ["a_frontal.dcm", "b_lateral.dcm", "c_lateral_by_code.dcm", "d_no_view.png"]
    assert listing("all") == (dict.fromkeys(names, ""), 0)  # no filter: no header is read
    assert listing(["LL"]) == ({"b_lateral.dcm": "LL", "c_lateral_by_code.dcm": "LL", "d_no_view.png": ""}, 1)
