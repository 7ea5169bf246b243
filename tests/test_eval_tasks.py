"""Evaluation tasks on real data_prep shards: metadata reading, label columns and policies, patient-level splits."""

import csv
import dataclasses
import os
import shutil
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from chexfound_jax.data.pipeline import ShardedSource
from chexfound_jax.eval import tasks
from chexfound_jax.eval.tasks import SplitRule, TaskSpec
from data_prep import local_runner, records, writers
from data_prep import stages as prep
from data_prep.sources import CHEXPERT_LABELS, get_source
from data_prep.sources.nih import NIH_LABELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERMANY = os.path.join(REPO, "tests", "data", "kermany")
NAN = np.nan


def kermany_rows() -> list[dict]:
    with open(os.path.join(KERMANY, "labels.csv"), newline="") as f:
        return list(csv.DictReader(f))


def virus_cell(i: int, row: dict) -> str:
    """A CheXpert-style cell per row: blank for NORMAL, 1 virus / 0 bacteria, and every 4th pneumonia -1."""
    if row["label"] == "0":
        return ""
    if i % 4 == 0:
        return "-1"
    return "1" if row["pneumonia_type"] == "virus" else "0"


def patient_of(i: int) -> str:
    """Rows 0-11 in patients of two images, 12-19 one each, 20-23 without a patient id."""
    return f"P{i // 2}" if i < 12 else (f"Q{i}" if i < 20 else "")


def view_of(i: int) -> str:
    return "LATERAL" if i in (3, 17) else ("AP" if i % 3 else "PA")


def split_of(i: int) -> str:
    return "test" if patient_of(i) in ("P1", "Q13", "Q14") or i == 22 else "train"


def build(root, out, name, columns, cells, rows, file_format="array_record") -> str:
    """A Folder-source data_prep dataset of kermany `rows` with label `columns` (cells(i, row) -> values)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *columns, "patient", "split", "view"])
        for i in rows:
            r = kermany_rows()[i]
            shutil.copy(os.path.join(KERMANY, r["file"]), os.path.join(root, r["file"]))
            w.writerow([r["file"], *cells(i, r), patient_of(i), split_of(i), view_of(i)])
    source = get_source(
        "folder",
        root,
        views="all",
        csv="labels.csv",
        path_column="file",
        label_columns=columns,
        patient_column="patient",
        split_column="split",
        view_column="view",
        source_name=name,
    )
    options = prep.PrepOptions(size=64, min_size=200, records_per_shard=5, file_format=file_format)
    local_runner.run_local(source, out, options, workers=1, progress=False)
    return os.fspath(writers.dataset_dir(out, name, prep.DATASET_VERSION))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Dataset a: all 24 images, labels (Pneumonia, Virus), ArrayRecord. Dataset b: 8 images, labels
    (Opacity, Pneumonia), TFRecord. Both have "train" and "test" splits."""
    out = tmp_path_factory.mktemp("shards")
    a = build(
        tmp_path_factory.mktemp("a"), out, "kerm_a", ["Pneumonia", "Virus"],
        lambda i, r: [r["label"], virus_cell(i, r)], range(24),
    )  # fmt: skip
    b = build(
        tmp_path_factory.mktemp("b"), out, "kerm_b", ["Opacity", "Pneumonia"], lambda i, r: ["-1", r["label"]],
        [0, 2, 4, 13, 14, 15, 16, 22], file_format="tfrecord",
    )  # fmt: skip
    return a, b


def expected_by_image() -> dict[str, dict]:
    """What each kermany image's record should say, from the CSV this module wrote."""
    out = {}
    for i, r in enumerate(kermany_rows()):
        image_id = r["file"].rsplit(".", 1)[0]
        virus = virus_cell(i, r)
        out[image_id] = {
            "i": i,
            "pneumonia": float(r["label"]),
            "virus": float(virus) if virus else NAN,
            "patient": patient_of(i) or image_id,
            "split": split_of(i),
            "view": view_of(i),
        }
    return out


# --- read_metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_read_metadata_matches_decode_record(shards, split):
    a, b = shards
    meta = tasks.read_metadata([a, b], split)
    source = ShardedSource([a, b], split)
    assert len(meta["record_index"]) == len(source) > 0
    np.testing.assert_array_equal(meta["record_index"], np.arange(len(source)))
    assert meta["label_names"].tolist() == ["Pneumonia", "Virus", "Opacity"]  # a's order, then b's new name
    for i in range(len(source)):
        rec = records.decode_record(source[i])
        for k in ("source", "path", "study_id", "image_id", "view_position", "split"):
            assert meta[k][i] == rec[k], (i, k)
        assert meta["patient_id"][i] == (rec["patient_id"] or rec["image_id"])
        d = meta["dataset"][i]
        names = writers.read_label_names([a, b][d])
        assert names == (["Pneumonia", "Virus"] if d == 0 else ["Opacity", "Pneumonia"])
        want = np.full(3, np.nan, np.float32)
        want[[meta["label_names"].tolist().index(n) for n in names]] = rec["labels"]
        np.testing.assert_array_equal(meta["labels"][i], want)
        assert source.locate(i)[0].parent.parent.name == ["kerm_a", "kerm_b"][d]
    # The records say what the CSV said.
    want = expected_by_image()
    for i, image_id in enumerate(meta["image_id"]):
        e = want[image_id]
        assert (meta["patient_id"][i], meta["split"][i], meta["view_position"][i]) == (e["patient"], split, e["view"])
        assert e["split"] == split
    assert np.isin(meta["dataset"], [0, 1]).all() and (meta["dataset"] == 1).any()


def test_read_metadata_is_fast_on_a_few_thousand_records(tmp_path):
    """Prints read_metadata's speed against decoding every record; asserts only equality, never time."""
    xray = os.path.join(REPO, "tests", "data", "images", "cxr_png_gray8_512_nih_cxr14_00000001_000.png")
    image = np.asarray(Image.open(xray).convert("L").resize((256, 256)))
    base = records.normalize_record(
        dict(image=image, source="bench", path="", patient_id="", study_id="", image_id="", view_position="PA",
             photometric="MONOCHROME2", split="train", bits_stored=8, original_height=256, original_width=256,
             pixel_spacing=[], labels=[1.0, 0.0, -1.0, np.nan])
    )  # fmt: skip
    png = records.encode_png(image)
    n = 3000
    items = list(range(n))

    def to_record(k):
        rec = {**base, "path": f"img/{k}.png", "image_id": f"img{k}", "patient_id": f"p{k // 3}"}
        return records.serialize_record(rec, png)

    ds_dir = writers.dataset_dir(tmp_path, "bench")
    done = writers.write_split(items, to_record, ds_dir=ds_dir, split="train", num_shards=4)
    writers.write_dataset_info(
        ds_dir, features=records.record_features(), label_names=["a", "b", "c", "d"],
        shard_lengths={"train": [done[s].num_records for s in range(4)]},
    )  # fmt: skip
    t0 = time.perf_counter()
    meta = tasks.read_metadata([ds_dir], "train")
    fast = time.perf_counter() - t0
    source = ShardedSource([ds_dir], "train")
    sample = range(0, n, 15)
    t0 = time.perf_counter()
    decoded = [records.decode_record(source[i]) for i in sample]
    slow = (time.perf_counter() - t0) * n / len(sample)
    mb = sum(p.stat().length for p in ds_dir.glob("*array_record*")) / 1e6
    print(
        f"\nread_metadata: {n} records ({mb:.0f} MB, 256 px PNGs) in {fast:.3f} s = {fast / n * 1e6:.0f} us/record; "
        f"decode_record: {slow / n * 1e6:.0f} us/record ({slow / fast:.0f}x slower)"
    )
    assert len(meta["image_id"]) == n
    for i, rec in zip(sample, decoded, strict=True):
        assert meta["image_id"][i] == rec["image_id"] and meta["patient_id"][i] == rec["patient_id"]
        np.testing.assert_array_equal(meta["labels"][i], rec["labels"])


def test_read_metadata_names_the_missing_split(shards):
    with pytest.raises(ValueError, match="kerm_a.*no split 'validate'"):
        tasks.read_metadata([shards[0]], "validate")


# --- label policies --------------------------------------------------------------------------------


def test_policies_on_hand_written_rows():
    raw = np.array([[1, 0, -1, NAN], [-1, -1, NAN, 0], [NAN, 1, 0, -1]], np.float32)
    want = {
        ("ignore", "ignore"): [[1, 0, NAN, NAN], [NAN, NAN, NAN, 0], [NAN, 1, 0, NAN]],
        ("zeros", "ignore"): [[1, 0, 0, NAN], [0, 0, NAN, 0], [NAN, 1, 0, 0]],
        ("ones", "ignore"): [[1, 0, 1, NAN], [1, 1, NAN, 0], [NAN, 1, 0, 1]],
        ("zeros", "zeros"): [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],  # CheXpert's official U-Zeros, NaN -> 0
        ("ones", "zeros"): [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]],
        ("ignore", "zeros"): [[1, 0, NAN, 0], [NAN, NAN, 0, 0], [0, 1, 0, NAN]],  # uncertain stays unknown
    }
    for (uncertain, missing), expected in want.items():
        got = tasks.apply_policies(raw, uncertain, missing)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.array(expected, np.float32), err_msg=f"{uncertain}/{missing}")
    np.testing.assert_array_equal(raw[0], [1, 0, -1, NAN])  # input untouched
    with pytest.raises(ValueError, match=r"1, 0, -1 or NaN; found \[0.5, 2.0\]"):
        tasks.apply_policies(np.array([[0.5, 1, 2]]))
    with pytest.raises(ValueError, match="policies"):
        tasks.apply_policies(raw, "maybe")


@pytest.mark.parametrize(
    ("uncertain", "missing", "virus_values"),
    [("ignore", "ignore", {1.0: 1.0, 0.0: 0.0, -1.0: NAN}), ("zeros", "ignore", {1.0: 1.0, 0.0: 0.0, -1.0: 0.0}),
     ("ones", "zeros", {1.0: 1.0, 0.0: 0.0, -1.0: 1.0})],
)  # fmt: skip
def test_policies_and_columns_on_shards(shards, uncertain, missing, virus_values):
    a, _ = shards
    task = TaskSpec(
        "virus", ("Viral", "Pneumonia"), label_columns=("Virus", "Pneumonia"), uncertain=uncertain, missing=missing,
        splits={"train": SplitRule("train"), "test": SplitRule("test")},
    )  # fmt: skip
    out = tasks.load_task([a], task, ("train", "test"))
    want = expected_by_image()
    seen = 0
    for table in out.values():
        assert table.labels.dtype == np.float32 and table.labels.shape == (len(table), 2)
        assert table.class_names == ("Viral", "Pneumonia")
        for image_id, row in zip(table.image_id, table.labels, strict=True):
            e = want[image_id]
            viral = 0.0 if (np.isnan(e["virus"]) and missing == "zeros") else virus_values.get(e["virus"], NAN)
            np.testing.assert_array_equal(row, [viral, e["pneumonia"]], err_msg=image_id)
            seen += 1
    assert seen == 24  # no row is all-unknown: Pneumonia is always known


def test_all_unknown_rows_are_dropped_and_views_filter(shards):
    a, _ = shards
    splits = {"train": SplitRule("train")}
    want = expected_by_image()
    viral = tasks.load_task([a], TaskSpec("v", ("Virus",), splits=splits), ["train"])["train"]
    expected = {k for k, e in want.items() if e["split"] == "train" and e["virus"] in (0.0, 1.0)}
    assert set(viral.image_id) == expected and len(viral) == len(expected)
    assert not np.isnan(viral.labels).any()
    frontal = TaskSpec("f", ("Pneumonia",), splits=splits, views=("pa", "ap"))
    table = tasks.load_task([a], frontal, ["train"])["train"]
    assert {want[k]["view"] for k in table.image_id} == {"AP", "PA"}
    assert len(table) == sum(e["split"] == "train" and e["view"] != "LATERAL" for e in want.values())


def test_missing_label_column_is_named_with_the_datasets_label_names(shards):
    a, b = shards
    splits = {"train": SplitRule("train")}
    with pytest.raises(ValueError, match=r"'Effusion'.*kerm_a.*\['Pneumonia', 'Virus'\]"):
        tasks.load_task([a], TaskSpec("x", ("Effusion",), splits=splits), ["train"])
    # Virus is in a but not in b.
    with pytest.raises(ValueError, match=r"'Virus'.*kerm_b.*\['Opacity', 'Pneumonia'\]"):
        tasks.load_task([a, b], TaskSpec("x", ("Virus", "Pneumonia"), splits=splits), ["train"])
    # "unknown": b's records have NaN for Virus whatever the missing policy; a's blanks follow it.
    task = TaskSpec(
        "x", ("Virus", "Pneumonia"), splits=splits, uncertain="zeros", missing="zeros", absent_columns="unknown"
    )
    table = tasks.load_task([a, b], task, ["train"])["train"]
    meta = tasks.read_metadata([a, b], "train")
    from_b = meta["dataset"][table.record_index] == 1
    assert from_b.any() and (~from_b).any()
    assert np.isnan(table.labels[from_b, 0]).all() and not np.isnan(table.labels[~from_b]).any()
    want = expected_by_image()
    np.testing.assert_array_equal(table.labels[from_b, 1], [want[k]["pneumonia"] for k in table.image_id[from_b]])
    with pytest.raises(ValueError, match="no split.*'val'"):
        tasks.load_task([a], task, ["train", "val"])


# --- splits ----------------------------------------------------------------------------------------


def holdout_task(seed=0, fractions=(0.5, 0.25, 0.25)):
    return TaskSpec(
        "pn", ("Pneumonia",), split_seed=seed,
        splits={"train": SplitRule("train", fractions, 0), "val": SplitRule("train", fractions, 1),
                "test": SplitRule("train", fractions, 2)},
    )  # fmt: skip


def patient_sets(out):
    return {s: set(t.patient_id) for s, t in out.items()}


def test_holdout_splits_are_patient_disjoint_and_cover_the_shard_split(shards):
    a, b = shards
    out = tasks.load_task([a, b], holdout_task())
    meta = tasks.read_metadata([a, b], "train")
    rows = np.concatenate([t.record_index for t in out.values()])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(meta["record_index"])))  # a partition of all records
    sets = patient_sets(out)
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    # Images of one patient stay together (P0-P5 have two images, in both datasets for P0-P2).
    for t in out.values():
        assert t.shard_split == "train" and t.task == "pn"
        np.testing.assert_array_equal(t.patient_id, meta["patient_id"][t.record_index])
        np.testing.assert_array_equal(t.labels[:, 0], meta["labels"][t.record_index, 0])
        np.testing.assert_array_equal(t.image_id, meta["image_id"][t.record_index])
        np.testing.assert_array_equal(t.path, meta["path"][t.record_index])
    # Balanced by image count: within one patient's images (2) of each share.
    n = len(rows)
    for t, f in zip(out.values(), (0.5, 0.25, 0.25), strict=True):
        assert abs(len(t) - f * n) <= 2, (len(t), f * n)


def test_holdout_is_seeded(shards):
    a, _ = shards
    first = tasks.load_task([a], holdout_task(seed=0))
    again = tasks.load_task([a], holdout_task(seed=0))
    other = tasks.load_task([a], holdout_task(seed=1))
    for s in first:
        np.testing.assert_array_equal(first[s].record_index, again[s].record_index)
    assert patient_sets(first) != patient_sets(other)
    # Asking for one split gives the same rows as asking for all.
    np.testing.assert_array_equal(tasks.load_task([a], holdout_task(), ["val"])["val"].record_index,
                                  first["val"].record_index)  # fmt: skip


def test_official_splits_read_their_shard_split(shards):
    a, b = shards
    task = TaskSpec(
        "pn", ("Pneumonia",),
        splits={"train": SplitRule("train", (0.75, 0.25), 0), "val": SplitRule("train", (0.75, 0.25), 1),
                "test": SplitRule("test")},
    )  # fmt: skip
    out = tasks.load_task([a, b], task)
    want = expected_by_image()
    assert {want[k]["split"] for k in out["test"].image_id} == {"test"}
    assert {want[k]["split"] for k in (*out["train"].image_id, *out["val"].image_id)} == {"train"}
    assert len(out["test"]) == len(ShardedSource([a, b], "test"))
    np.testing.assert_array_equal(out["test"].record_index, np.arange(len(out["test"])))


def test_holdout_parts_never_split_a_patient_and_match_official_sizes():
    rng = np.random.default_rng(0)
    ids = np.array([f"p{k}" for k in rng.integers(0, 300, 1000)])
    parts = tasks.holdout_parts(ids, (0.7, 0.1, 0.2), seed=5)
    for p in np.unique(ids):
        assert len(set(parts[ids == p])) == 1
    largest = np.unique(ids, return_counts=True)[1].max()
    for k, f in enumerate((0.7, 0.1, 0.2)):
        assert abs((parts == k).sum() - f * len(ids)) <= largest / 2 + 1
    np.testing.assert_array_equal(parts, tasks.holdout_parts(ids[::-1], (0.7, 0.1, 0.2), seed=5)[::-1])
    # One image per patient: the official split sizes exactly (asserted in data/datasets/).
    for name, sizes in {"shenzhen": (463, 65, 134), "montgomery": (96, 14, 28), "jsrt": (171, 24, 50),
                        "nih": (76_522, 10_002), "cxr_lt": (207_096, 51_775)}.items():  # fmt: skip
        rule = tasks.TASKS[name].splits["train"]
        singles = np.array([f"i{k}" for k in range(sum(sizes))])
        counts = np.bincount(tasks.holdout_parts(singles, rule.holdout, seed=0))
        assert tuple(counts) == sizes, name


# --- task registry and configs ---------------------------------------------------------------------


def test_registered_tasks_follow_the_spec():
    t = tasks.TASKS
    assert len(t["cxr_lt"].class_names) == 40 and len(set(t["cxr_lt"].class_names)) == 40
    names = t["cxr_lt"].class_names
    # The notebook's index map (official notebooks/chexfound_example.ipynb).
    assert {names[i]: i for i in (1, 4, 6, 7, 25)} == {
        "Atelectasis": 1, "Cardiomegaly": 4, "Consolidation": 6, "Edema": 7, "Pleural Effusion": 25,
    }  # fmt: skip
    assert names[0] == "Adenopathy" and names[-1] == "Tuberculosis" and names[35] == "Round(ed) Atelectasis"
    assert t["chexpert"].class_names == ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
    assert set(t["chexpert"].columns()) <= set(CHEXPERT_LABELS)
    assert (t["chexpert"].uncertain, t["chexpert"].missing) == ("zeros", "zeros")
    assert (t["chexpert_uones"].uncertain, t["chexpert_uones"].missing) == ("ones", "zeros")
    assert t["chexpert"].splits["val"].shard_split == "valid"
    assert t["nih"].columns() == NIH_LABELS and len(NIH_LABELS) == 14
    assert t["nih"].splits["train"].shard_split == "train_val" and t["nih"].splits["test"].shard_split == "test"
    assert t["nih_no_finding"].splits == t["nih"].splits
    # The official binarizer's columns: scikit-learn's MultiLabelBinarizer over "A|B" finding strings.
    from sklearn.preprocessing import MultiLabelBinarizer  # a test dependency: missing, the test fails

    mlb = MultiLabelBinarizer()
    mlb.fit([["Hernia", "Mass"], ["No Finding"], *([n] for n in reversed(NIH_LABELS))])
    assert t["nih_no_finding"].class_names == tuple(mlb.classes_) and len(mlb.classes_) == 15
    for name, cls in (("shenzhen", "Tuberculosis"), ("montgomery", "Tuberculosis"), ("jsrt", "Nodule")):
        assert t[name].class_names == (cls,) and t[name].binary()
        assert [r.part for r in t[name].splits.values()] == [0, 1, 2]
    assert not t["cxr_lt"].binary()
    for task in t.values():
        assert set(task.splits) == {"train", "val", "test"}


def test_registered_tasks_read_the_data_prep_sources_label_names():
    """Each task's columns are label names its data_prep source writes, and its shard splits are split names."""
    # data_prep is part of this repository: a missing module or source is a regression, not a reason to skip.
    from data_prep.sources import SOURCES as sources

    for task, source in (("cxr_lt", "cxr_lt"), ("shenzhen", "shenzhen"), ("montgomery", "montgomery"),
                         ("jsrt", "jsrt"), ("nih", "nih_cxr14"), ("chexpert", "chexpert")):  # fmt: skip
        assert source in sources, f"no data_prep source {source!r} for task {task!r}"
        assert set(tasks.TASKS[task].columns()) <= set(sources[source].label_names), task
    assert tasks.TASKS["cxr_lt"].columns() == tuple(sources["cxr_lt"].label_names)
    assert tasks.TASKS["cxr_lt"].splits["test"].shard_split == "development"


def test_task_from_config():
    t = tasks.task_from_config(ml_collections.ConfigDict({"name": "chexpert", "uncertain": "ignore"}))
    assert t.uncertain == "ignore" and t.missing == "zeros" and t.class_names == tasks.TASKS["chexpert"].class_names
    assert tasks.task_from_config({"name": "nih"}) == tasks.TASKS["nih"]
    full = {
        "name": "mine", "class_names": ["Tuberculosis"], "label_columns": ["TB"], "split_seed": 3,
        "splits": {"train": {"shard_split": "train", "holdout": [0.8, 0.2], "part": 0},
                   "val": {"shard_split": "train", "holdout": [0.8, 0.2], "part": 1}, "test": "test"},
    }  # fmt: skip
    t = tasks.task_from_config(ml_collections.ConfigDict(full))
    assert t.class_names == ("Tuberculosis",) and t.columns() == ("TB",) and t.split_seed == 3
    assert t.splits == {"train": SplitRule("train", (0.8, 0.2), 0), "val": SplitRule("train", (0.8, 0.2), 1),
                        "test": SplitRule("test")}  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown keys \['classes', 'seed'\]"):
        tasks.task_from_config({"name": "nih", "seed": 1, "classes": []})
    with pytest.raises(ValueError, match=r"split 'val': unknown keys \['fraction'\]"):
        tasks.task_from_config({"name": "nih", "splits": {"val": {"shard_split": "x", "fraction": 0.1}}})
    with pytest.raises(ValueError, match="needs class_names"):
        tasks.task_from_config({"name": "unknown_task"})
    with pytest.raises(ValueError, match="uncertain must be one of"):
        tasks.task_from_config({"name": "nih", "uncertain": "U-Zeros"})


def test_overlapping_split_rules_are_refused():
    with pytest.raises(ValueError, match="without one shared holdout"):
        TaskSpec("x", ("a",), splits={"train": SplitRule("train"), "val": SplitRule("train", (0.9, 0.1), 1)})
    with pytest.raises(ValueError, match="same part"):
        TaskSpec("x", ("a",), splits={"train": SplitRule("t", (0.9, 0.1), 0), "val": SplitRule("t", (0.9, 0.1), 0)})
    with pytest.raises(ValueError, match="summing to 1"):
        SplitRule("train", (0.5, 0.4))
    with pytest.raises(ValueError, match="2 label_columns for 1 classes"):
        TaskSpec("x", ("a",), label_columns=("a", "b"))


def test_label_table_subset():
    t = tasks.LabelTable(
        "x", "train", "train", np.arange(5) * 10, np.arange(5, dtype=np.float32)[:, None],
        np.array(list("aabbc")), np.array(list("vwxyz")), np.array(list("VWXYZ")),
    )  # fmt: skip
    s = t.subset(np.array([4, 1]))
    assert len(s) == 2 and s.record_index.tolist() == [40, 10] and s.patient_id.tolist() == ["c", "a"]
    assert s.labels[:, 0].tolist() == [4, 1] and s.image_id.tolist() == ["z", "w"] and s.path.tolist() == ["Z", "W"]
    with pytest.raises(IndexError):
        t.subset([5])
    m = dataclasses.replace(t, second_record=np.array([1, 0, 3, 2, 4])).subset([3, 4])
    assert m.second_record.tolist() == [2, 4]


def test_second_views_on_hand_written_studies():
    rows = [  # (dataset, source, patient, study, view)
        (0, "mimic", "p1", "s1", "PA"),  # 0: s1 has PA, LATERAL, AP -> the lateral
        (0, "mimic", "p1", "s1", "LATERAL"),  # 1: the first other view that differs: the PA
        (0, "mimic", "p1", "s1", "AP"),  # 2: differs from the PA first
        (0, "mimic", "p1", "s2", "PA"),  # 3: alone in its study -> itself
        (0, "mimic", "p2", "", "PA"),  # 4: no study id -> itself
        (0, "mimic", "p2", "", "LATERAL"),  # 5: no study id -> itself
        (1, "mimic", "p1", "s1", "PA"),  # 6: same ids in another dataset: another study -> 7
        (1, "mimic", "p1", "s1", "pa "),  # 7: the same view (case, blanks) -> the first other record, 6
        (0, "chexpert", "p1", "s1", "PA"),  # 8: another source -> itself
    ]
    d, src, pat, study, view = zip(*rows, strict=True)
    meta = {
        "record_index": np.arange(len(rows), dtype=np.int64),
        "dataset": np.array(d, np.int32),
        "source": np.array(src),
        "patient_id": np.array(pat),
        "study_id": np.array(study),
        "view_position": np.array(view),
    }
    assert tasks.second_views(meta).tolist() == [1, 0, 0, 3, 4, 5, 7, 6, 8]


def test_multiview_tables_pair_each_row_with_its_study(tmp_path):
    """Frontal rows kept by the view filter still get their study's lateral as the second view."""
    release = tmp_path / "release"
    (release / "images").mkdir(parents=True)
    files = sorted(f for f in os.listdir(os.path.join(KERMANY, "images")) if f.endswith(".png"))[:6]
    with open(release / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "finding", "patient", "study", "view", "split"])
        for i, name in enumerate(files):  # studies s0, s0, s1, s1, s2 (alone), s3 (alone)
            shutil.copy(os.path.join(KERMANY, "images", name), release / "images" / name)
            view = "LATERAL" if i in (1, 2) else "PA"
            w.writerow([f"images/{name}", i % 2, f"p{i // 2}", f"s{min(i // 2, 2) if i < 5 else 3}", view, "train"])
    source = get_source(
        "folder", os.fspath(release), csv="labels.csv", path_column="file", label_columns=["finding"],
        patient_column="patient", study_column="study", view_column="view", split_column="split", views="all",
    )  # fmt: skip
    local_runner.run_local(source, os.fspath(tmp_path / "out"), prep.PrepOptions(size=64, min_size=64), workers=1)
    ds = writers.dataset_dir(tmp_path / "out", "folder", prep.DATASET_VERSION)
    task = TaskSpec("t", ("finding",), splits={"train": SplitRule("train")}, views=("PA",), multiview=True)
    table = tasks.load_task([ds], task, splits=("train",))["train"]
    meta = tasks.read_metadata([ds], "train")
    by_record = lambda r: meta["path"][r]
    pairs = {
        os.path.basename(p): os.path.basename(by_record(s))
        for p, s in zip(table.path, table.second_record, strict=True)
    }
    assert pairs == {files[0]: files[1], files[3]: files[2], files[4]: files[4], files[5]: files[5]}
    assert tasks.load_task([ds], dataclasses.replace(task, multiview=False), ("train",))["train"].second_record is None
