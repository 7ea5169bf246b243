"""data_prep.audit: shard counts, manifest reconciliation, seeded samples, contact sheet and histograms."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import audit, records, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
LABELS = ["NORMAL", "PNEUMONIA"]
CONSTANT8 = 200  # 200 / 255 * 64 = 50.2 -> bin 50
CONSTANT16 = 51400  # 51400 / 65535 * 64 = 50.2 -> bin 50


def real_images() -> list[np.ndarray]:
    """Real chest X-rays, shrunk: Kermany (wide, shorter side 40) and NIH (square, and a tall crop)."""
    kermany = sorted(f for f in os.listdir(os.path.join(DATA, "kermany", "images")) if f.endswith(".png"))[::4]
    assert len(kermany) == 6  # 6 of 24, NORMAL and PNEUMONIA
    out = []
    for name in kermany:
        with Image.open(os.path.join(DATA, "kermany", "images", name)) as im:
            w, h = im.size
            out.append(np.asarray(im.convert("L").resize((round(w * 40 / h), 40), Image.Resampling.LANCZOS)))
    for name in sorted(f for f in os.listdir(os.path.join(DATA, "images")) if f.endswith(".png")):
        with Image.open(os.path.join(DATA, "images", name)) as im:
            small = np.asarray(im.convert("L").resize((48, 48), Image.Resampling.LANCZOS))
        out += [small, small[:, 12:36]]  # square 48x48 and tall 48x24
    return out


def synthetic_images() -> list[np.ndarray]:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (20, 1))  # every bin once per row
    return [np.full((30, 50), CONSTANT8, np.uint8), ramp, np.zeros((16, 16), np.uint8)]


def example(i: int, image: np.ndarray, split: str) -> dict:
    return {
        "image": image,
        "source": ["kermany", "nih"][i % 2],
        "path": f"img/{i}.png",
        "patient_id": f"p{i}",
        "study_id": f"s{i}",
        "image_id": f"img{i:03d}",
        "view_position": ["PA", "AP", ""][i % 3],
        "photometric": "MONOCHROME2",
        "split": split,
        "bits_stored": 8 if image.dtype == np.uint8 else 16,
        "original_height": image.shape[0],
        "original_width": image.shape[1],
        "pixel_spacing": [],
        "labels": [float(i % 2), 1.0 - i % 2],
    }


def build(output, name: str, file_format: str, dtype, splits: dict[str, tuple[list[np.ndarray], int]]) -> dict:
    """Writes a dataset; returns {split: examples in reading order (shard 0's items first, ...)}."""
    ds_dir = writers.dataset_dir(output, name)
    order = {}
    for split, (images, num_shards) in splits.items():
        items = [example(i, img, split) for i, img in enumerate(images)]
        writers.write_split(
            items, records.encode_record, ds_dir=ds_dir, split=split, num_shards=num_shards, file_format=file_format
        )
        order[split] = [x for s in range(num_shards) for x in items[s::num_shards]]
    writers.write_dataset_info(ds_dir, features=records.record_features(dtype), label_names=LABELS)
    return order


def manifest_for(order: dict, **changes) -> dict:
    written = sum(len(v) for v in order.values())
    counts = {
        "listed": written + 9,
        "view_filtered": 3,
        "missing": 2,
        "seen": written + 4,
        "written": written,
        "duplicate": 1,
        "near_duplicate": 1,
        "rejected": {"too_small": 1, "blank": 1},
        "failed": 0,
    }
    counts.update(changes)
    return {
        "source": "toy",
        "input": "/nowhere",
        "options": {},
        "counts": counts,
        "splits": {s: {"written": len(v), "num_shards": 0} for s, v in order.items()},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two datasets under one output: cxr_ar (uint8, ArrayRecord) and cxr_tf (uint16, TFRecord)."""
    output = tmp_path_factory.mktemp("audit") / "out"
    real, synth = real_images(), synthetic_images()
    ar = build(output, "cxr_ar", "array_record", np.uint8, {"train": (real[:7] + synth, 3), "test": (real[7:], 1)})
    tf_images = [(img.astype(np.uint16) * 257) for img in real[:5]] + [np.full((24, 36), CONSTANT16, np.uint16)]
    tf = build(output, "cxr_tf", "tfrecord", np.uint16, {"train": (tf_images, 2)})
    ar_dir = output / "cxr_ar" / "1.0.0"
    manifest = manifest_for(ar)
    for split, n in (("train", 3), ("test", 1)):
        manifest["splits"][split]["num_shards"] = n
    (ar_dir / "manifest.json").write_text(json.dumps(manifest))
    (ar_dir / "failures.csv").write_text(
        'path,reason,message\na.dcm,decode_error,bad\nb.dcm,too_small,120 px\nc.dcm,decode_error,"x, y"\n'
    )
    return output, {"cxr_ar": ar, "cxr_tf": tf}


def expected_cell(image: np.ndarray, cell: int = audit.CELL) -> np.ndarray:
    """A contact sheet cell computed from the spec: 8-bit, bilinear fit of the longer side, centred on black."""
    eight = image if image.dtype == np.uint8 else np.round(image / 65535 * 255).astype(np.uint8)
    h, w = image.shape
    size = (round(w * cell / max(h, w)), round(h * cell / max(h, w)))
    thumb = np.asarray(Image.fromarray(eight).resize(size, Image.Resampling.BILINEAR))
    out = np.zeros((cell, cell), np.uint8)
    y, x = (cell - size[1]) // 2, (cell - size[0]) // 2
    out[y : y + size[1], x : x + size[0]] = thumb
    return out


def sheet_cell(sheet: np.ndarray, k: int, n: int, cell: int = audit.CELL) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(n)))
    r, c = divmod(k, cols)
    top, left = 2 + r * (cell + 2), 2 + c * (cell + 2)
    return sheet[top : top + cell, left : left + cell]


# --- finding and counting --------------------------------------------------------------------------


def test_find_datasets_at_every_level(built, tmp_path):
    output, _ = built
    both = [output / "cxr_ar" / "1.0.0", output / "cxr_tf" / "1.0.0"]
    assert audit.find_datasets(output) == both
    assert audit.find_datasets(output / "cxr_tf") == both[1:]
    assert audit.find_datasets(str(both[0])) == both[:1]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        audit.find_datasets(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        audit.find_datasets(tmp_path / "nope")


@pytest.mark.parametrize("name", ["cxr_ar", "cxr_tf"])
def test_split_counts_are_what_was_written(built, name):
    output, orders = built
    counts = audit.split_counts(output / name / "1.0.0")
    order = orders[name]
    assert sorted(counts) == sorted(order)
    for split, c in counts.items():
        assert c.records == len(order[split])
        assert c.format == ("array_record" if name == "cxr_ar" else "tfrecord")
    if name == "cxr_ar":
        assert counts["train"].shard_records == (4, 3, 3) and counts["test"].shard_records == (3,)
    else:
        assert counts["train"].shard_records == (3, 3)


def test_unfinished_split_is_named(tmp_path):
    ds_dir = writers.dataset_dir(tmp_path, "half")
    items = [example(i, np.full((8, 8), i, np.uint8), "val") for i in range(4)]
    writers.write_split(items, records.encode_record, ds_dir=ds_dir, split="val", num_shards=3, shards=[0, 2])
    assert audit.find_datasets(tmp_path) == [ds_dir]  # found by its shards, no dataset_info.json yet
    with pytest.raises(ValueError, match=r"split 'val' is unfinished: shards \[1\] of 3"):
        audit.split_counts(ds_dir)


def test_dataset_info_disagreement_is_a_problem(built, tmp_path):
    output, _ = built
    ds_dir = tmp_path / "cxr_tf" / "1.0.0"
    shutil.copytree(output / "cxr_tf" / "1.0.0", ds_dir)
    counts = audit.split_counts(ds_dir)
    assert audit.check_dataset_info(ds_dir, counts) == []
    info = json.loads((ds_dir / "dataset_info.json").read_text())
    info["splits"][0]["shardLengths"] = ["3", "4"]
    (ds_dir / "dataset_info.json").write_text(json.dumps(info))
    (problem,) = audit.check_dataset_info(ds_dir, counts)
    assert "'train'" in problem and "[3, 4]" in problem and "[3, 3]" in problem


# --- manifest and failures -------------------------------------------------------------------------


def test_reconcile_accepts_consistent_and_names_each_mismatch(built):
    output, orders = built
    counts = audit.split_counts(output / "cxr_ar" / "1.0.0")
    order = orders["cxr_ar"]
    good = json.loads((output / "cxr_ar" / "1.0.0" / "manifest.json").read_text())
    assert audit.reconcile(good, counts) == []

    (p,) = audit.reconcile(
        manifest_for(order, seen=good["counts"]["seen"] + 1, listed=good["counts"]["listed"] + 1)
        | {"splits": good["splits"]},
        counts,
    )
    assert p.startswith("counts.seen=") and "near_duplicate=1" in p
    (p,) = audit.reconcile(manifest_for(order, listed=1) | {"splits": good["splits"]}, counts)
    assert p.startswith("counts.listed=1 != view_filtered+missing+seen=")
    bad_split = json.loads(json.dumps(good))
    bad_split["splits"]["test"]["written"] = 2
    (p,) = audit.reconcile(bad_split, counts)
    assert p == "split 'test': manifest written=2 != 3 records in shards"
    bad_split["splits"]["test"]["written"] = 3
    bad_split["splits"]["val"] = {"written": 0, "num_shards": 1}
    (p,) = audit.reconcile(bad_split, counts)
    assert "'val'" in p and "no shards" in p
    no_near = json.loads(json.dumps(good))
    del no_near["counts"]["near_duplicate"]
    (p,) = audit.reconcile(no_near, counts)
    assert "near_duplicate" in p and "missing" in p


def test_failure_tally(built):
    output, _ = built
    tally = audit.failure_tally(output / "cxr_ar" / "1.0.0" / "failures.csv")
    assert tally == {"decode_error": 2, "too_small": 1} and list(tally) == ["decode_error", "too_small"]


# --- sampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cxr_ar", "cxr_tf"])
def test_sample_is_seeded_and_reads_the_right_records(built, name):
    output, orders = built
    counts = audit.split_counts(output / name / "1.0.0")
    total = sum(c.records for c in counts.values())
    keys = audit.sample_keys(counts, 4, seed=1)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert keys == audit.sample_keys(counts, 4, seed=1)
    assert keys != audit.sample_keys(counts, 4, seed=2)
    everything = audit.sample_keys(counts, 1000, seed=5)
    assert everything == [(s, i) for s in sorted(counts) for i in range(counts[s].records)]
    assert len(everything) == total
    for sample in audit.sample_records(counts, 4, seed=1):
        want = orders[name][sample.split][sample.index]
        assert records.records_equal(sample.record, records.normalize_record(want))


# --- pictures --------------------------------------------------------------------------------------


def test_contact_sheet_grid_and_cells():
    real = real_images()
    noise16 = np.random.default_rng(0).integers(0, 65535, (20, 30), endpoint=True).astype(np.uint16)
    images = [*real[:4], real[-1], real[-2].astype(np.uint16) * 257, np.full((30, 50), CONSTANT8, np.uint8), noise16]
    sheet = audit.contact_sheet(images)
    cell, n = audit.CELL, len(images)  # 8 images: 3 x 3 grid
    assert sheet.dtype == np.uint8 and sheet.shape == (2 + 3 * (cell + 2), 2 + 3 * (cell + 2))
    for k, image in enumerate(images):
        np.testing.assert_array_equal(sheet_cell(sheet, k, n), expected_cell(image), err_msg=f"cell {k}")
    assert (sheet[:2] == 255).all() and (sheet[:, cell + 2 : cell + 4] == 255).all()  # white gaps
    tall = sheet_cell(sheet, 4, n)  # 48x24 -> 128x64 centred: black columns either side
    assert (tall[:, :32] == 0).all() and (tall[:, 96:] == 0).all() and tall[:, 32:96].any()
    const = sheet_cell(sheet, 6, n)  # 30x50 -> 77x128 band of exactly 200
    assert (const[25:102] == CONSTANT8).all() and (const[:25] == 0).all() and (const[102:] == 0).all()


def test_uint16_to_8_bit_rounds_over_the_full_range():
    got = audit.to_uint8(np.array([[0, 128, 129, 257 * 100 + 128, 65535]], np.uint16))
    np.testing.assert_array_equal(got, [[0, 0, 1, 100, 255]])
    assert got.dtype == np.uint8


def test_intensity_histograms():
    real = real_images()
    images = [
        np.full((30, 50), CONSTANT8, np.uint8),
        np.full((7, 9), CONSTANT16, np.uint16),
        np.array([[0, 255]], np.uint8),
        np.array([[0, 65535, 65535, 32768]], np.uint16),
        real[0],
        real[0].astype(np.uint16) * 257,
    ]
    hists = audit.intensity_histograms(images)
    assert hists.shape == (6, 64)
    np.testing.assert_allclose(hists.sum(axis=1), 1.0)
    assert hists[0, 50] == 1.0 and hists[1, 50] == 1.0
    assert hists[2, 0] == 0.5 and hists[2, 63] == 0.5
    assert hists[3, 0] == 0.25 and hists[3, 63] == 0.5 and hists[3, 32] == 0.25  # 32768/65535*64 = 32.0005
    want = np.histogram(real[0] / 255.0, bins=64, range=(0.0, 1.0))[0] / real[0].size
    np.testing.assert_array_equal(hists[4], want)
    np.testing.assert_allclose(hists[5], want)  # x * 257 is the same fraction of the uint16 range
    plot = audit.histogram_plot(hists)
    assert plot.shape == (420, 720, 3) and plot.dtype == np.uint8
    assert len(np.unique(plot.reshape(-1, 3), axis=0)) > 3  # band, line, axes and text on white


# --- reports and the CLI ---------------------------------------------------------------------------


def read_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def test_cli_entry_point(built, tmp_path):
    output, orders = built
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "data_prep.audit", str(output), f"--workdir={tmp_path}", "--samples=9", "--seed=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reconciles" in proc.stdout and "decode_error 2" in proc.stdout
    for name, order in orders.items():
        out = tmp_path / name / "1.0.0"
        report = json.loads((out / "audit.json").read_text())
        assert report["splits"] == {
            s: {"shards": {"train": 3, "test": 1}[s] if name == "cxr_ar" else 2, "records": len(v)}
            for s, v in order.items()
        }
        total = sum(len(v) for v in order.values())
        assert report["total"]["records"] == total and report["problems"] == []
        n = min(9, total)  # cxr_tf holds only 6
        assert report["sample"]["n"] == n and len(report["sample"]["keys"]) == n
        assert sum(report["sample"]["dtype"].values()) == n
        assert list(report["sample"]["dtype"]) == ["uint8" if name == "cxr_ar" else "uint16"]
        np.testing.assert_allclose(sum(report["histogram"]["mean"]), 1.0)
        picked = [order[s][i]["image"] for s, i in report["sample"]["keys"]]
        heights = sorted(im.shape[0] for im in picked)
        assert report["sample"]["height"] == {
            "min": heights[0],
            "median": float(np.median(heights)),
            "max": heights[-1],
        }
        sheet = read_png(out / "contact_sheet.png")
        rows = 3 if n == 9 else 2
        assert sheet.shape == (2 + rows * 130, 2 + 3 * 130)
        for k in (0, n - 1):
            np.testing.assert_array_equal(sheet_cell(sheet, k, n), expected_cell(picked[k]))
        hist_png = read_png(out / "histograms.png")
        assert hist_png.shape == (420, 720, 3)
    ar = json.loads((tmp_path / "cxr_ar" / "1.0.0" / "audit.json").read_text())
    assert ar["failures"] == {"decode_error": 2, "too_small": 1}
    assert ar["manifest"]["counts"]["written"] == 13


def test_mismatch_exits_non_zero(built, tmp_path, capsys):
    output, _ = built
    ds_dir = tmp_path / "cxr_ar" / "1.0.0"
    shutil.copytree(output / "cxr_ar" / "1.0.0", ds_dir)
    manifest = json.loads((ds_dir / "manifest.json").read_text())
    manifest["counts"]["near_duplicate"] += 2
    (ds_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        audit.run([str(ds_dir)], samples=3, workdir=str(tmp_path / "pics"))
    assert exit_info.value.code not in (0, None)
    assert "counts.seen=" in str(exit_info.value.code) and "near_duplicate=3" in str(exit_info.value.code)
    assert "DO NOT RECONCILE" in capsys.readouterr().out
    report = json.loads((tmp_path / "pics" / "audit.json").read_text())
    assert len(report["problems"]) == 1 and report["sample"]["n"] == 3
    assert read_png(tmp_path / "pics" / "contact_sheet.png").shape == (2 + 2 * 130, 2 + 2 * 130)


def test_no_dataset_exits_naming_path(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        audit.run([str(tmp_path)])
    assert str(tmp_path) in str(exit_info.value.code)
