"""Downstream source adapters (CXR-LT 2024, Shenzhen, Montgomery, JSRT) over tiny fake releases, the JSRT raw
.IMG reader, and tiny end-to-end builds.

Fake releases use the real file names and CSV headers; images are real chest X-rays from tests/data (the
Kermany PNGs, and an NIH PNG turned into a JSRT-style raw file) where a build decodes them, placeholders where
only listing is tested.
"""

import csv
import math
import pathlib
import shutil

import numpy as np
import pytest
from helpers import by_id, touch, write_csv
from PIL import Image

from data_prep import decode, decode_jsrt, local_runner, records, stages, writers
from data_prep.sources import SOURCES, get_source
from data_prep.sources.cxr_lt import CXR_LT_LABELS, CxrLt, match_label_columns
from data_prep.sources.jsrt import Jsrt
from data_prep.sources.shenzhen import Montgomery, Shenzhen

DATA = pathlib.Path(__file__).parent / "data"
NIH_PNG = DATA / "images" / "cxr_png_gray8_512_nih_cxr14_00000001_000.png"
NAN = math.nan

# The 40 classes as the official notebook lists them (the released head's order), typed independently of the code.
SPEC_CLASSES = (
    "Adenopathy, Atelectasis, Azygos Lobe, Calcification of the Aorta, Cardiomegaly, Clavicle Fracture, "
    "Consolidation, Edema, Emphysema, Enlarged Cardiomediastinum, Fibrosis, Fissure, Fracture, Granuloma, "
    "Hernia, Hydropneumothorax, Infarction, Infiltration, Kyphosis, Lobar Atelectasis, Lung Lesion, "
    "Lung Opacity, Mass, Nodule, Normal, Pleural Effusion, Pleural Other, Pleural Thickening, "
    "Pneumomediastinum, Pneumonia, Pneumoperitoneum, Pneumothorax, Pulmonary Embolism, "
    "Pulmonary Hypertension, Rib Fracture, Round(ed) Atelectasis, Subcutaneous Emphysema, Support Devices, "
    "Tortuous Aorta, Tuberculosis"
).split(", ")


def kermany_pngs(n: int) -> list[pathlib.Path]:
    with open(DATA / "kermany" / "labels.csv", newline="") as f:
        return [DATA / "kermany" / row["file"] for row in list(csv.DictReader(f))[:n]]


def test_registry_and_label_orders():
    assert {"cxr_lt": CxrLt, "shenzhen": Shenzhen, "montgomery": Montgomery, "jsrt": Jsrt}.items() <= SOURCES.items()
    assert list(CXR_LT_LABELS) == SPEC_CLASSES and len(set(CXR_LT_LABELS)) == 40
    # The notebook's index map of the released head.
    for name, index in {"Atelectasis": 1, "Cardiomegaly": 4, "Consolidation": 6, "Edema": 7}.items():
        assert CXR_LT_LABELS.index(name) == index
    assert CXR_LT_LABELS.index("Pleural Effusion") == 25
    assert Shenzhen.label_names == Montgomery.label_names == ("Tuberculosis",) and Jsrt.label_names == ("Nodule",)


# --- CXR-LT 2024 --------------------------------------------------------------------------------------------

ID_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning", "fpath"]
D = [f"{i}aa804e-bde0afdd-112c0b34-7bc16630-4e38401{i}" for i in range(8)]
IDS = {  # dicom -> (subject, study, view)
    D[0]: ("10000032", "50414267", "PA"),
    D[1]: ("10000032", "50414267", "LATERAL"),
    D[2]: ("10000764", "57375967", "AP"),  # its file is absent
    D[3]: ("10000898", "50771383", ""),  # no view
    D[4]: ("11000011", "51029426", "AP"),
    D[5]: ("11000011", "51029426", "LL"),
    D[6]: ("12000011", "52029426", "PA"),
}


def mimic_path(dicom: str, ext: str = ".jpg") -> str:
    subject, study, _ = IDS[dicom]
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}{ext}"


def id_cells(dicom: str) -> list[str]:
    subject, study, view = IDS[dicom]
    meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}.get(view, "")
    return [dicom, subject, study, view, meaning, mimic_path(dicom)]


def one_hot(*names: str) -> tuple[float, ...]:
    return tuple(float(n in names) for n in CXR_LT_LABELS)


def make_cxr_lt(root: pathlib.Path, meta: pathlib.Path) -> None:
    train = {D[0]: one_hot("Round(ed) Atelectasis", "Tuberculosis"), D[1]: one_hot("Normal")}
    train |= {D[2]: one_hot("Adenopathy"), D[3]: one_hot("Support Devices", "Edema")}
    rows = [id_cells(d) + [str(int(v)) for v in labels] for d, labels in train.items()]
    write_csv(meta / "train_labeled.csv", ID_COLUMNS + list(CXR_LT_LABELS), rows)
    # Development: the class columns reversed and spelled differently; matched by name, not position.
    spelled = {"Round(ed) Atelectasis": "Rounded Atelectasis", "Pleural Effusion": "pleural effusion"}
    spelled |= {"Pleural Other": "Pleural_Other", "Calcification of the Aorta": "Calcification of the aorta"}
    header = [spelled.get(n, n) for n in reversed(CXR_LT_LABELS)]
    dev = {D[4]: one_hot("Round(ed) Atelectasis", "Pleural Effusion", "Pleural Other")}
    rows = [id_cells(d) + [str(int(v)) for v in reversed(labels)] for d, labels in dev.items()]
    write_csv(meta / "development_labeled_task1.csv", ID_COLUMNS + header, rows)
    # Test: the challenge-phase file without labels or views; views come from MIMIC-CXR-JPG's metadata table.
    write_csv(meta / "test_task1.csv", ["dicom_id", "fpath"], [[d, mimic_path(d)] for d in (D[5], D[6])])
    mimic_meta = [[d, IDS[d][0], IDS[d][1], IDS[d][2]] for d in (D[5], D[6])]
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
              mimic_meta, gz=True)  # fmt: skip
    for d in IDS:
        if d != D[2]:
            touch(root, mimic_path(d))


def test_cxr_lt_official_layout(tmp_path):
    root, meta = tmp_path / "mimic-cxr-jpg" / "2.0.0", tmp_path / "cxr-lt-iccv-workshop-cvamd" / "2.0.0"
    make_cxr_lt(root, meta / "cxr-lt-2024")  # found in the release's cxr-lt-2024/ folder
    src = get_source("cxr_lt", root, meta)
    items = by_id(list(src.items()))
    assert list(items) == [D[0], D[4], D[6]]  # D[1], D[5] lateral; D[3] unknown view; D[2] missing
    a = items[D[0]]
    assert a.relpath == f"files/p10/p10000032/s50414267/{D[0]}.jpg" and a.path == root / a.relpath
    assert (a.source, a.patient_id, a.study_id, a.view_position, a.split) == (
        "cxr_lt",
        "10000032",
        "50414267",
        "PA",
        "train",
    )
    assert src.label_names == CXR_LT_LABELS
    assert a.labels == one_hot("Round(ed) Atelectasis", "Tuberculosis")
    assert a.labels[35] == a.labels[39] == 1.0 and sum(a.labels) == 2
    dev = items[D[4]]
    assert dev.split == "development" and dev.view_position == "AP"
    assert dev.labels == one_hot("Round(ed) Atelectasis", "Pleural Effusion", "Pleural Other")
    t = items[D[6]]
    assert (t.split, t.view_position, t.patient_id, t.study_id) == ("test", "PA", "12000011", "52029426")
    assert all(math.isnan(v) for v in t.labels) and len(t.labels) == 40
    assert [m.image_id for m in src.missing] == [D[2]] and src.missing[0].labels == one_hot("Adenopathy")
    assert src.view_filtered == 3

    every = get_source("cxr_lt", root, meta, views="all")
    items = by_id(list(every.items()))
    assert list(items) == [D[0], D[1], D[3], D[4], D[5], D[6]]
    assert items[D[3]].view_position == "" and items[D[3]].labels == one_hot("Support Devices", "Edema")
    assert items[D[5]].view_position == "LL" and items[D[5]].split == "test"


def test_cxr_lt_csv_options(tmp_path):
    # One CSV given explicitly: ids in MIMIC's folder spelling, no path column (built from the ids), split by name.
    rows = [[D[0], "p10000032", "s50414267", *one_hot("Mass")], [D[2], "10000764", "57375967", *one_hot()]]
    write_csv(tmp_path / "labels" / "dev_subset.csv", ["dicom_id", "subject_id", "study_id", *CXR_LT_LABELS], rows)
    touch(tmp_path, mimic_path(D[0]))
    src = get_source("cxr_lt", tmp_path, tmp_path / "labels", csv="dev_subset.csv", keep_unknown_view=True)
    items = list(src.items())
    assert [(i.relpath, i.patient_id, i.study_id, i.split) for i in items] == [
        (mimic_path(D[0]), "10000032", "50414267", "development")
    ]
    assert items[0].labels == one_hot("Mass") and [m.relpath for m in src.missing] == [mimic_path(D[2])]
    # An explicit split and path column; ids come from the path when the CSV has no id columns.
    row = [f"./files-512/p10/p10000032/s50414267/{D[0]}.png", *one_hot("Hernia")]
    write_csv(tmp_path / "x.csv", ["image", *CXR_LT_LABELS], [row])
    touch(tmp_path, f"files-512/p10/p10000032/s50414267/{D[0]}.png")
    src = get_source("cxr_lt", tmp_path, csv="x.csv", split="holdout", path_column="image", views="all")
    (item,) = src.items()
    assert (item.relpath, item.image_id, item.patient_id, item.study_id, item.split) == (
        f"files-512/p10/p10000032/s50414267/{D[0]}.png",
        D[0],
        "10000032",
        "50414267",
        "holdout",
    )
    assert item.labels == one_hot("Hernia")
    # A {split: csv} mapping, as --source_option csv='{"train": ...}' passes it.
    src = get_source("cxr_lt", tmp_path, tmp_path / "labels", csv={"train": "dev_subset.csv"}, views="all")
    assert [i.split for i in src.items()] == ["train"]


def test_cxr_lt_header_variants_and_errors(tmp_path):
    variants = ["round(ed) atelectasis", "Rounded Atelectasis", "ROUNDED_ATELECTASIS", "Round Atelectasis"]
    for variant in variants:
        header = ["dicom_id", *[variant if n == "Round(ed) Atelectasis" else n.upper() for n in CXR_LT_LABELS]]
        columns = match_label_columns(header, CXR_LT_LABELS, "x.csv")
        assert columns["Round(ed) Atelectasis"] == variant and columns["Nodule"] == "NODULE"
    assert match_label_columns(["dicom_id", "fpath", "No Finding"], CXR_LT_LABELS, "x.csv") == {}
    with pytest.raises(ValueError, match=r"both match class 'Round\(ed\) Atelectasis'"):
        match_label_columns([*CXR_LT_LABELS, "Rounded Atelectasis"], CXR_LT_LABELS, "x.csv")

    def listing(header, rows, name="train_labeled.csv", **options):
        write_csv(tmp_path / name, header, rows)
        return list(get_source("cxr_lt", tmp_path, views="all", **options).items())

    base = ["dicom_id", "fpath"]
    with pytest.raises(ValueError, match=r"train_labeled\.csv: no column for class\(es\) \['Tuberculosis'\]"):
        listing(base + list(CXR_LT_LABELS[:-1]), [[D[0], mimic_path(D[0]), *["0"] * 39]])
    with pytest.raises(ValueError, match=r"train_labeled\.csv: a train CSV needs the class columns"):
        listing(base, [[D[0], mimic_path(D[0])]])
    with pytest.raises(ValueError, match=r"train_labeled\.csv line 3: 'Edema' is 'yes', not a label"):
        rows = [[d, mimic_path(d), *["0"] * 40] for d in D[:2]]
        rows[1][2 + CXR_LT_LABELS.index("Edema")] = "yes"
        listing(base + list(CXR_LT_LABELS), rows)
    with pytest.raises(ValueError, match=r"no path column 'image'"):
        listing(base + list(CXR_LT_LABELS), [], path_column="image")
    with pytest.raises(ValueError, match=r"no path column \(fpath or path\) and no \['subject_id', 'study_id'\]"):
        listing(["dicom_id", *CXR_LT_LABELS], [])
    (tmp_path / "train_labeled.csv").unlink()
    with pytest.raises(FileNotFoundError, match="train_labeled.csv"):
        listing(["dicom_id"], [], name="other.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        list(get_source("cxr_lt", tmp_path, csv="nope.csv").items())


# --- Shenzhen / Montgomery ----------------------------------------------------------------------------------


def test_shenzhen(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    for name in ("CHNCXR_0001_0.png", "CHNCXR_0002_1.png", "CHNCXR_0327_1.png", "Thumbs.db", "CHNCXR_0009_2.png"):
        touch(root, f"CXR_png/{name}")
    for stem in ("CHNCXR_0001_0", "CHNCXR_0002_1", "CHNCXR_0003_1"):  # 0003's image is absent
        (root / "ClinicalReadings").mkdir(exist_ok=True)
        (root / "ClinicalReadings" / f"{stem}.txt").write_text("male 35yrs\nnormal\n")
    touch(root, "NLM-ChinaCXRSet-ReadMe.docx")
    src = get_source("shenzhen", root)  # default frontal filter: unknown views are kept for this release
    items = list(src.items())
    assert [(i.relpath, i.patient_id, i.study_id, i.image_id, i.labels) for i in items] == [
        ("CXR_png/CHNCXR_0001_0.png", "0001", "CHNCXR_0001_0", "CHNCXR_0001_0", (0.0,)),
        ("CXR_png/CHNCXR_0002_1.png", "0002", "CHNCXR_0002_1", "CHNCXR_0002_1", (1.0,)),
        ("CXR_png/CHNCXR_0327_1.png", "0327", "CHNCXR_0327_1", "CHNCXR_0327_1", (1.0,)),
    ]
    assert all(i.split == "" and i.view_position == "" and i.source == "shenzhen" for i in items)
    assert [(m.relpath, m.labels) for m in src.missing] == [("CXR_png/CHNCXR_0003_1.png", (1.0,))]
    assert list(get_source("shenzhen", root, keep_unknown_view=False).items()) == []
    with pytest.raises(FileNotFoundError, match="MCUCXR_NNNN"):  # Shenzhen's names are not Montgomery's
        list(get_source("montgomery", root).items())


def test_montgomery_layouts(tmp_path):
    root = tmp_path / "MontgomerySet"
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0104_1.png", "MCUCXR_0104_1.jpg"):
        touch(root, f"CXR_png/{name}")
    touch(root, "ManualMask/leftMask/MCUCXR_0001_0.png")  # masks share the names: never listed
    touch(root, "ManualMask/rightMask/MCUCXR_0002_0.png")
    src = get_source("montgomery", root)
    assert [(i.relpath, i.patient_id, i.labels) for i in src.items()] == [
        ("CXR_png/MCUCXR_0001_0.png", "0001", (0.0,)),
        ("CXR_png/MCUCXR_0104_1.png", "0104", (1.0,)),  # .png preferred over a .jpg copy
    ]
    assert src.missing == []
    flat = tmp_path / "flat"  # a mirror with the images at the root
    touch(flat, "MCUCXR_0005_1.jpg")
    touch(flat, "readme.txt")
    assert [i.relpath for i in get_source("montgomery", flat).items()] == ["MCUCXR_0005_1.jpg"]
    assert [i.relpath for i in get_source("montgomery", root, image_dir="ManualMask/leftMask").items()] == [
        "ManualMask/leftMask/MCUCXR_0001_0.png"
    ]
    with pytest.raises(FileNotFoundError, match="no MCUCXR_NNNN_\\[01\\] images"):
        list(get_source("montgomery", tmp_path / "empty").items())


# --- JSRT ---------------------------------------------------------------------------------------------------


def test_jsrt_listing(tmp_path):
    root = tmp_path / "JSRT"
    for name in ("JPCLN001.IMG", "JPCLN001.png", "JPCLN154.IMG", "JPCNN093.IMG", "JPCNN001.IMG", "CLNDAT_EN.txt"):
        touch(root, f"All247images/{name}")
    touch(root, "scr/masks/heart/JPCLN002.gif")
    src = get_source("jsrt", root)
    items = list(src.items())
    assert [(i.relpath, i.patient_id, i.study_id, i.image_id, i.labels) for i in items] == [
        ("All247images/JPCLN001.IMG", "JPCLN001", "JPCLN001", "JPCLN001", (1.0,)),
        ("All247images/JPCLN154.IMG", "JPCLN154", "JPCLN154", "JPCLN154", (1.0,)),
        ("All247images/JPCNN001.IMG", "JPCNN001", "JPCNN001", "JPCNN001", (0.0,)),
        ("All247images/JPCNN093.IMG", "JPCNN093", "JPCNN093", "JPCNN093", (0.0,)),
    ]
    assert all(i.split == "" and i.view_position == "" for i in items)
    # Every one of the 247 release names is accounted for; the absent ones are missing, with their labels.
    assert len(items) + len(src.missing) == 247
    assert sum(m.labels[0] for m in src.missing) == 154 - 2 and src.missing[0].relpath == "All247images/JPCLN002.IMG"
    png_first = get_source("jsrt", root, extensions=(".png", ".IMG"))
    assert next(png_first.items()).relpath == "All247images/JPCLN001.png"

    mirror = tmp_path / "mirror"  # PNG conversions in images/, masks elsewhere
    touch(mirror, "images/JPCNN002.png")
    touch(mirror, "masks/JPCNN002.png")
    src = get_source("jsrt", mirror)
    assert [i.relpath for i in src.items()] == ["images/JPCNN002.png"]
    assert src.missing[0].relpath == "images/JPCLN001.png"  # the folder's own extension
    with pytest.raises(FileNotFoundError, match="no JSRT images"):
        list(get_source("jsrt", tmp_path / "nothing").items())


def write_jsrt_raw(path: pathlib.Path, gray8: np.ndarray) -> None:
    """A JSRT-style raw file from a display-ready 512x512 8-bit image: 4x nearest upsampling to 2048x2048,
    12-bit values, inverted (0 = white) and stored as big-endian 16-bit words, as the release stores them."""
    big = np.repeat(np.repeat(gray8, 4, axis=0), 4, axis=1).astype(np.float64)
    stored = 4095 - np.round(big * 4095 / 255).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.astype(">u2").tofile(path)


def test_jsrt_raw_decode(tmp_path):
    gray = np.asarray(Image.open(NIH_PNG))
    path = tmp_path / "JPCLN001.IMG"
    write_jsrt_raw(path, gray)
    assert path.stat().st_size == 2048 * 2048 * 2 and decode_jsrt.is_jsrt_raw(path)
    decoded = decode.decode_file(path, source="jsrt")
    expected = np.repeat(np.repeat(gray, 4, axis=0), 4, axis=1) / 255.0  # bright bone, as the PNG shows it
    assert decoded.pixels.shape == (2048, 2048) and decoded.pixels.dtype == np.float32
    assert np.abs(decoded.pixels - expected).max() < 0.6 / 4095 + 1e-6
    meta = decoded.metadata
    assert set(meta) == set(decode.METADATA_KEYS)
    assert (meta["format"], meta["bits_stored"], meta["inverted"]) == ("jsrt_raw", 12, True)
    assert meta["image_id"] == "JPCLN001" and meta["source"] == "jsrt"
    assert meta["pixel_spacing"] == (0.175, 0.175) and meta["original_size"] == (2048, 2048)
    raw = decode.decode_jsrt_raw(path, inverted=False)
    assert np.allclose(raw.pixels, 1.0 - decoded.pixels, atol=1e-6)

    little = tmp_path / "little_endian.img"  # byte order matters: the same words little-endian decode otherwise
    np.fromfile(path, dtype=">u2").astype("<u2").tofile(little)
    with pytest.raises(decode.Rejected) as err:
        decode.decode_file(little)
    assert err.value.reason == "decode_error" and "exceeds 12 bits" in err.value.message
    short = tmp_path / "JPCLN002.IMG"  # any other .IMG goes to the DICOM reader, as before
    short.write_bytes(path.read_bytes()[:1000])
    assert not decode_jsrt.is_jsrt_raw(short)
    with pytest.raises(decode.Rejected) as err:
        decode.decode_file(short)
    assert err.value.reason == "unreadable"
    dicom = DATA / "dicom" / "chest" / "derived_cxr_cr_mono1_10bit_explicitLE_part10_from_CR-MONO1-10-chest.dcm"
    assert not decode_jsrt.is_jsrt_raw(dicom) and decode.decode_file(dicom).metadata["format"] == "dicom"


# --- end to end ---------------------------------------------------------------------------------------------

OPTIONS = stages.PrepOptions(size=64, min_size=200, records_per_shard=2)


def read_records(ds_dir: pathlib.Path, info: dict) -> dict[str, dict]:
    import grain

    out = {}
    for split, meta in info["splits"].items():
        paths = [str(p) for p in writers.shard_paths(ds_dir, split, meta["num_shards"], "array_record")]
        source = grain.sources.ArrayRecordDataSource(paths)
        out |= {(rec := records.decode_record(source[i]))["image_id"]: rec for i in range(len(source))}
    return out


def test_build_jsrt_end_to_end(tmp_path):
    root = tmp_path / "JSRT"
    write_jsrt_raw(root / "All247images" / "JPCLN001.IMG", np.asarray(Image.open(NIH_PNG)))
    for name, png in zip(("JPCLN002", "JPCNN001", "JPCNN002"), kermany_pngs(3), strict=True):
        shutil.copy(png, root / "All247images" / f"{name}.png")
    info = local_runner.run_local(get_source("jsrt", root), tmp_path / "out", OPTIONS, workers=1, progress=False)
    ds_dir = writers.dataset_dir(tmp_path / "out", "jsrt")
    assert writers.read_label_names(ds_dir) == ["Nodule"]
    c = info["counts"]
    assert (c["listed"], c["missing"], c["written"], c["view_filtered"]) == (247, 243, 4, 0)
    recs = read_records(ds_dir, info)
    assert sorted(recs) == ["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"]
    for name, rec in recs.items():
        assert rec["labels"].tolist() == [float(name.startswith("JPCLN"))] and rec["split"] == ""
        assert rec["patient_id"] == name and rec["source"] == "jsrt"
    raw = recs["JPCLN001"]
    assert list(info["splits"]) == ["train"]  # no official split: TFDS's default
    assert (raw["path"], raw["bits_stored"], raw["photometric"]) == ("All247images/JPCLN001.IMG", 12, "MONOCHROME1")
    # The raw file went through the pipeline the right way up: it matches the display-ready PNG it came from.
    reference = decode.to_output(decode.decode_image(NIH_PNG), size=64).astype(np.float64)
    assert raw["image"].shape == (64, 64) and np.abs(raw["image"] - reference).mean() < 2.0


def test_build_cxr_lt_end_to_end(tmp_path):
    root, meta = tmp_path / "mimic", tmp_path / "cxr-lt-2024"
    splits = {"train": (D[0], D[1]), "development": (D[4],), "test": (D[6],)}
    labels = {D[0]: one_hot("Pneumonia"), D[1]: one_hot("Normal", "Support Devices"), D[4]: one_hot("Tuberculosis")}
    for dicom, png in zip(IDS, kermany_pngs(len(IDS)), strict=True):
        if dicom in (D[0], D[1], D[4], D[6]):
            (root / mimic_path(dicom)).parent.mkdir(parents=True, exist_ok=True)
            Image.open(png).save(root / mimic_path(dicom), quality=95)
    files = {"train": "train_labeled.csv", "development": "development_labeled_task1.csv"}
    for split, name in files.items():
        rows = [id_cells(d) + [int(v) for v in labels[d]] for d in splits[split]]
        write_csv(meta / name, ID_COLUMNS + list(CXR_LT_LABELS), rows)
    write_csv(meta / "test_task1.csv", ID_COLUMNS, [id_cells(D[6])])
    src = get_source("cxr_lt", root, meta, views="all")
    info = local_runner.run_local(src, tmp_path / "out", OPTIONS, workers=1, progress=False)
    ds_dir = writers.dataset_dir(tmp_path / "out", "cxr_lt")
    assert writers.read_label_names(ds_dir) == list(CXR_LT_LABELS)
    assert {s: v["written"] for s, v in info["splits"].items()} == {"train": 2, "development": 1, "test": 1}
    recs = read_records(ds_dir, info)
    for split, dicoms in splits.items():
        for dicom in dicoms:
            rec = recs[dicom]
            assert rec["split"] == split and rec["path"] == mimic_path(dicom)
            assert (rec["patient_id"], rec["study_id"], rec["view_position"]) == IDS[dicom]
            expected = labels.get(dicom, (NAN,) * 40)
            assert np.array_equal(rec["labels"], np.array(expected, np.float32), equal_nan=True)


def test_build_command_line_takes_the_new_sources(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "MontgomerySet"
    for i, png in enumerate(kermany_pngs(2)):
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(png, root / "images" / f"MCUCXR_{i + 1:04d}_{i}.png")
    cmd = [sys.executable, "-m", "data_prep.build", "--source=montgomery", f"--input={root}", f"--workdir={tmp_path}",
           "--size=64", "--min_size=200", "--workers=1", "--source_option=image_dir=images"]  # fmt: skip
    result = subprocess.run(cmd, cwd=DATA.parent.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "montgomery: listed 2" in result.stdout and "written 2" in result.stdout
    assert writers.read_label_names(writers.dataset_dir(tmp_path, "montgomery")) == ["Tuberculosis"]
