"""data_prep.sources: each adapter over a tiny fake tree with the release's real file names and CSV columns."""

import math
import pathlib

import pytest
from helpers import by_id, same, touch, write_csv

from data_prep.sources import CHEXPERT_LABELS, SOURCES, get_source
from data_prep.sources import base as base_mod
from data_prep.sources.nih import NIH_LABELS
from data_prep.sources.vindr_cxr import VINDR_LABELS

NAN = math.nan


def test_registry_and_helpers(tmp_path):
    assert set(SOURCES) == {
        "mimic_cxr_jpg",
        "mimic_cxr_dicom",
        "chexpert",
        "padchest",
        "brax",
        "nih_cxr14",
        "vindr_cxr",
        "folder",
        "cxr_lt",
        "shenzhen",
        "montgomery",
        "jsrt",
    }
    with pytest.raises(KeyError):
        get_source("nope", tmp_path)
    assert [base_mod.parse_label(v) for v in ("1.0", "0", "-1.0")] == [1.0, 0.0, -1.0]
    assert math.isnan(base_mod.parse_label("")) and math.isnan(base_mod.parse_label(None))
    assert base_mod.clean_relpath("./a\\b.png") == "a/b.png"
    with pytest.raises(FileNotFoundError):  # a missing metadata file is an error, never an empty source
        list(get_source("chexpert", tmp_path).items())
    with pytest.raises(ValueError):
        get_source("chexpert", tmp_path, views="lateral")


# --- MIMIC-CXR ----------------------------------------------------------------------------------------------

MIMIC_META = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_LABEL_COLUMNS = sorted(CHEXPERT_LABELS)  # the release's chexpert.csv is alphabetical
D1 = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
D2 = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"
D3 = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"
D4 = "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"


def make_mimic(root: pathlib.Path, ext: str, gz: bool) -> None:
    suffix = ".csv.gz" if gz else ".csv"
    meta = [
        [D1, "10000032", "50414267", "CHEST (PA AND LAT)", "PA", 3056, 2544, 21800506, 213014.531, "", "", ""],
        [D2, "10000032", "50414267", "CHEST (PA AND LAT)", "LATERAL", 3056, 2544, 21800506, 213014.531, "", "", ""],
        [D3, "10000764", "57375967", "CHEST (PORTABLE AP)", "AP", 2544, 3056, 21321015, 150023, "", "", ""],
        [D4, "11000011", "51029426", "CHEST (PORTABLE AP)", "AP", 2544, 3056, 21321015, 150023, "", "", ""],
    ]
    write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", MIMIC_META, meta, gz)
    study1 = {"No Finding": "1.0", "Cardiomegaly": "-1.0", "Edema": "0.0"}
    study2 = {"Pleural Effusion": "1.0"}
    rows = [
        ["10000032", "50414267", *[study1.get(c, "") for c in MIMIC_LABEL_COLUMNS]],
        ["10000764", "57375967", *[study2.get(c, "") for c in MIMIC_LABEL_COLUMNS]],
    ]  # study 51029426 is absent from the label table
    write_csv(root / f"mimic-cxr-2.0.0-chexpert{suffix}", ["subject_id", "study_id", *MIMIC_LABEL_COLUMNS], rows, gz)
    splits = [[D1, "50414267", "10000032", "train"], [D2, "50414267", "10000032", "train"]]
    splits += [[D3, "57375967", "10000764", "validate"], [D4, "51029426", "11000011", "test"]]
    write_csv(root / f"mimic-cxr-2.0.0-split{suffix}", ["dicom_id", "study_id", "subject_id", "split"], splits, gz)
    for subject, study, dicom in (("10000032", "50414267", D1), ("10000032", "50414267", D2)):
        touch(root, f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}{ext}")
    touch(root, f"files/p10/p10000764/s57375967/{D3}{ext}")  # D4's file is absent


@pytest.mark.parametrize("gz", [False, True])
def test_mimic_jpg(tmp_path, gz):
    make_mimic(tmp_path, ".jpg", gz)
    src = get_source("mimic_cxr_jpg", tmp_path)
    items = by_id(list(src.items()))
    assert set(items) == {D1, D3}  # D2 lateral filtered, D4 missing
    a = items[D1]
    assert a.relpath == f"files/p10/p10000032/s50414267/{D1}.jpg" and a.path == tmp_path / a.relpath
    assert (a.source, a.patient_id, a.study_id, a.view_position, a.split) == (
        "mimic_cxr_jpg",
        "10000032",
        "50414267",
        "PA",
        "train",
    )
    expected = tuple({"No Finding": 1.0, "Cardiomegaly": -1.0, "Edema": 0.0}.get(n, NAN) for n in CHEXPERT_LABELS)
    assert src.label_names == CHEXPERT_LABELS and same(a.labels, expected)
    assert items[D3].split == "validate" and items[D3].labels[CHEXPERT_LABELS.index("Pleural Effusion")] == 1.0
    assert [m.image_id for m in src.missing] == [D4]
    assert src.missing[0].relpath == f"files/p11/p11000011/s51029426/{D4}.jpg"
    assert all(math.isnan(v) for v in src.missing[0].labels) and src.missing[0].split == "test"
    assert set(by_id(list(get_source("mimic_cxr_jpg", tmp_path, views="all").items()))) == {D1, D2, D3}


def test_mimic_dicom_with_separate_metadata(tmp_path):
    meta, dicom = tmp_path / "jpg", tmp_path / "dicom"
    make_mimic(meta, ".jpg", gz=True)
    make_mimic(dicom, ".dcm", gz=False)
    for f in dicom.glob("*.csv"):
        f.unlink()  # the DICOM release carries no ViewPosition table
    src = get_source("mimic_cxr_dicom", dicom, meta, views=("PA", "AP", "LATERAL"))
    items = by_id(list(src.items()))
    assert set(items) == {D1, D2, D3}
    assert items[D2].path == dicom / f"files/p10/p10000032/s50414267/{D2}.dcm"
    assert [m.image_id for m in src.missing] == [D4]


# --- CheXpert -----------------------------------------------------------------------------------------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def test_chexpert(tmp_path):
    root = tmp_path / "CheXpert-v1.0"
    cells = {"No Finding": "", "Cardiomegaly": "1.0", "Edema": "-1.0", "Support Devices": "0.0"}
    labels = [cells.get(n, "") for n in CHEXPERT_LABELS]
    train = [
        ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", *labels],
        ["CheXpert-v1.0/train/patient00002/study2/view1_frontal.jpg", "Female", 87, "Frontal", "PA", *labels],
        ["CheXpert-v1.0/train/patient00002/study2/view2_lateral.jpg", "Female", 87, "Lateral", "", *labels],
        ["CheXpert-v1.0/train/patient00003/study1/view1_frontal.jpg", "Male", 41, "Frontal", "AP", *labels],
    ]
    valid = [["CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "AP"]]
    valid[0] += ["1.0" if n == "Pneumonia" else "0.0" for n in CHEXPERT_LABELS]
    write_csv(root / "train.csv", CHEXPERT_HEADER, train)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, valid)
    for row in train[:3] + valid:
        touch(root, row[0].split("/", 1)[1])  # patient00003 is absent
    src = get_source("chexpert", root)
    items = by_id(list(src.items()))
    assert set(items) == {"patient00001/study1/view1_frontal", "patient00002/study2/view1_frontal"} | {
        "patient64541/study1/view1_frontal"
    }
    a = items["patient00001/study1/view1_frontal"]
    assert a.relpath == "train/patient00001/study1/view1_frontal.jpg" and a.path.is_file()
    assert (a.patient_id, a.study_id, a.view_position, a.split) == (
        "patient00001",
        "patient00001/study1",
        "AP",
        "train",
    )
    assert same(
        a.labels,
        tuple({"Cardiomegaly": 1.0, "Edema": -1.0, "Support Devices": 0.0}.get(n, NAN) for n in CHEXPERT_LABELS),
    )
    v = items["patient64541/study1/view1_frontal"]
    assert v.split == "valid" and v.labels == tuple(float(n == "Pneumonia") for n in CHEXPERT_LABELS)
    assert [m.relpath for m in src.missing] == ["train/patient00003/study1/view1_frontal.jpg"]
    lateral = [i for i in get_source("chexpert", root, views="all").items() if i.view_position == "LATERAL"]
    assert [i.relpath for i in lateral] == ["train/patient00002/study2/view2_lateral.jpg"]


# --- PadChest -----------------------------------------------------------------------------------------------

PADCHEST_HEADER = [
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
]
PC = [f"{i:03d}16666666666666666666666666666666666_abc{i}.png" for i in range(5)]


def make_padchest(root: pathlib.Path) -> None:
    def row(image, folder, study, patient, projection, labels):
        return [image, folder, 20140915, study, patient, 1930, "M", "POSTEROANTERIOR", projection, "Manual", labels]

    rows = [
        row(PC[0], 0, "st0", "pa0", "PA", "['pleural effusion', ' cardiomegaly']"),
        row(PC[1], 0, "st0", "pa0", "L", "['pleural effusion', ' cardiomegaly']"),
        row(PC[2], 1, "st1", "pa1", "AP_horizontal", "['normal']"),
        row(PC[3], 1, "st2", "pa2", "AP", ""),
        row(PC[4], 2, "st3", "pa3", "PA", "['NSG tube', 'laminar atelectasis']"),
    ]
    write_csv(
        root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
        PADCHEST_HEADER,
        [[*r, "", "", "", ""] for r in rows],
    )
    for r in rows[:4]:
        touch(root, f"{r[1]}/{r[0]}")  # PC[4] is absent


def test_padchest(tmp_path):
    make_padchest(tmp_path)
    src = get_source("padchest", tmp_path)
    items = {i.relpath: i for i in src.items()}
    assert set(items) == {f"0/{PC[0]}", f"1/{PC[2]}", f"1/{PC[3]}"}
    a = items[f"0/{PC[0]}"]
    assert (a.patient_id, a.study_id, a.image_id, a.view_position, a.split) == ("pa0", "st0", PC[0][:-4], "PA", "")
    names = src.label_names
    assert names[0] == "No Finding" and len(names) == 14
    assert a.labels == tuple(float(n in ("Pleural Effusion", "Cardiomegaly")) for n in names)
    assert items[f"1/{PC[2]}"].labels == tuple(float(n == "No Finding") for n in names)
    assert all(math.isnan(v) for v in items[f"1/{PC[3]}"].labels)  # unlabeled row
    assert [m.relpath for m in src.missing] == [f"2/{PC[4]}"]
    assert src.missing[0].labels == tuple(float(n in ("Support Devices", "Atelectasis")) for n in names)

    present = get_source("padchest", tmp_path, findings="present", views="all")
    items = {i.relpath: i for i in present.items()}
    assert present.label_names == ("cardiomegaly", "laminar atelectasis", "normal", "nsg tube", "pleural effusion")
    assert items[f"0/{PC[1]}"].labels == (1.0, 0.0, 0.0, 0.0, 1.0)
    custom = get_source("padchest", tmp_path, findings=["cardiomegaly", "normal"])
    assert custom.label_names == ("cardiomegaly", "normal")
    assert {i.image_id: i.labels for i in custom.items()}[PC[2][:-4]] == (0.0, 1.0)


# --- BRAX ---------------------------------------------------------------------------------------------------


def test_brax(tmp_path):
    header = ["DicomPath", "PngPath", "PatientID", "PatientSex", "PatientAge", "AccessionNumber", "ViewPosition"]
    header += list(CHEXPERT_LABELS)
    lab = [{"No Finding": "1", "Cardiomegaly": "0", "Edema": "-1"}.get(n, "") for n in CHEXPERT_LABELS]
    rows = [
        ["images/id_1/Accession_11/i-1.dcm", "images/id_1/Accession_11/i-1.png", "id_1", "F", "65", "11", "PA", *lab],
        ["images/id_1/Accession_11/i-2.dcm", "images/id_1/Accession_11/i-2.png", "id_1", "F", "65", "11", "L", *lab],
        ["images/id_2/Accession_21/i-3.dcm", "images/id_2/Accession_21/i-3.png", "id_2", "M", "70", "21", "AP", *lab],
    ]
    write_csv(tmp_path / "master_spreadsheet_update.csv", header, rows)
    for r in rows[:2]:
        touch(tmp_path, r[1])
        touch(tmp_path, r[0])
    src = get_source("brax", tmp_path)
    items = list(src.items())
    assert [(i.relpath, i.patient_id, i.study_id, i.image_id, i.view_position) for i in items] == [
        ("images/id_1/Accession_11/i-1.png", "id_1", "11", "i-1", "PA")
    ]
    assert same(
        items[0].labels,
        tuple({"No Finding": 1.0, "Cardiomegaly": 0.0, "Edema": -1.0}.get(n, NAN) for n in CHEXPERT_LABELS),
    )
    assert [m.relpath for m in src.missing] == ["images/id_2/Accession_21/i-3.png"]
    dicom = get_source("brax", tmp_path, image_format="dicom", views="all")
    assert [i.relpath for i in dicom.items()] == [r[0] for r in rows[:2]]


# --- NIH ChestX-ray14 ---------------------------------------------------------------------------------------

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
NIH_HEADER += "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"


@pytest.mark.parametrize("kaggle", [False, True])
def test_nih(tmp_path, kaggle):
    lines = [
        NIH_HEADER,
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
        "00000002_000.png,No Finding,0,2,81,M,AP,2500,2048,0.171,0.171,",
        "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,",
    ]
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    if kaggle:
        touch(tmp_path, "images_001/images/00000001_000.png")
        touch(tmp_path, "images_001/images/00000001_001.png")
        touch(tmp_path, "images_002/images/00000002_000.png")
    else:
        for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png"):
            touch(tmp_path, f"images/{name}")
    src = get_source("nih_cxr14", tmp_path)
    items = by_id(list(src.items()))
    assert list(items) == ["00000001_000", "00000001_001", "00000002_000"]
    b = items["00000001_001"]
    assert b.relpath == ("images_001/images/00000001_001.png" if kaggle else "images/00000001_001.png")
    assert (b.patient_id, b.study_id, b.view_position, b.split) == ("1", "00000001_001", "PA", "train_val")
    assert src.label_names == (*NIH_LABELS, "No Finding")
    assert b.labels == (*(float(n in ("Cardiomegaly", "Emphysema")) for n in NIH_LABELS), 0.0)
    c = items["00000002_000"]
    assert c.split == "test" and c.view_position == "AP" and c.labels == (0.0,) * 14 + (1.0,)
    assert [m.relpath for m in src.missing] == ["images/00000003_000.png"]
    assert src.missing[0].labels[NIH_LABELS.index("Hernia")] == 1.0


# --- VinDr-CXR ----------------------------------------------------------------------------------------------


def test_vindr(tmp_path):
    ids = ["000434271f63a053c4128a0ba6352c7f", "00053190460d56c53cc3e57321387478", "0005e8e3701dfb1dd93d53e2ff537b6e"]
    test_id = "002a34c58c5b758217ed1f584ccbcfe9"

    def votes(**on):
        return [str(on.get(n, 0)) for n in VINDR_LABELS]

    train = [
        [ids[0], "R11", *votes(Cardiomegaly=1)],
        [ids[0], "R12", *votes(Cardiomegaly=1, ILD=1)],
        [ids[0], "R13", *votes(**{"No finding": 1})],
        [ids[1], "R8", *votes(**{"No finding": 1})],
        [ids[1], "R9", *votes(**{"No finding": 1})],
        [ids[1], "R10", *votes(**{"No finding": 1})],
        [ids[2], "R1", *votes(Atelectasis=1)],
        [ids[2], "R2", *votes(Atelectasis=1)],
        [ids[2], "R3", *votes()],
    ]
    write_csv(tmp_path / "annotations/image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS], train)
    test_header = ["image_id", *[n if n != "Other diseases" else "Other disease" for n in VINDR_LABELS]]
    write_csv(tmp_path / "annotations/image_labels_test.csv", test_header, [[test_id, *votes(**{"Other diseases": 1})]])
    for name in ids[:2]:
        touch(tmp_path, f"train/{name}.dicom")
    touch(tmp_path, f"test/{test_id}.dicom")  # ids[2] is absent

    src = get_source("vindr_cxr", tmp_path)
    items = by_id(list(src.items()))
    assert list(items) == [ids[0], ids[1], test_id]
    a = items[ids[0]]
    assert (a.relpath, a.study_id, a.patient_id, a.view_position, a.split) == (
        f"train/{ids[0]}.dicom",
        ids[0],
        "",
        "",
        "train",
    )
    assert a.labels == tuple(float(n == "Cardiomegaly") for n in VINDR_LABELS)  # majority: ILD 1/3 is negative
    anyp = by_id(list(get_source("vindr_cxr", tmp_path, aggregate="any").items()))
    assert anyp[ids[0]].labels == tuple(float(n in ("Cardiomegaly", "ILD", "No finding")) for n in VINDR_LABELS)
    t = items[test_id]
    assert t.split == "test" and t.labels == tuple(float(n == "Other diseases") for n in VINDR_LABELS)
    assert [m.relpath for m in src.missing] == [f"train/{ids[2]}.dicom"]
    assert src.missing[0].labels == tuple(float(n == "Atelectasis") for n in VINDR_LABELS)
    assert list(get_source("vindr_cxr", tmp_path, keep_unknown_view=False).items()) == []


# --- generic folder / CSV -----------------------------------------------------------------------------------


def test_folder_walk(tmp_path):
    for rel in ("a/1.png", "a/b/2.JPG", "c/3.dcm", "c/4.jpeg", "notes.txt", "c/5.dicom"):
        touch(tmp_path, rel)
    src = get_source("folder", tmp_path)
    items = list(src.items())
    assert [i.relpath for i in items] == ["a/1.png", "a/b/2.JPG", "c/3.dcm", "c/4.jpeg", "c/5.dicom"]
    assert items[0].image_id == "a/1" and items[0].labels == () and src.missing == []


def test_folder_csv(tmp_path):
    rows = [
        ["./img/1.png", "p1", "PA", "train", "1", ""],
        ["img/2.png", "p1", "LATERAL", "train", "0", "-1"],
        ["img/3.png", "p2", "AP", "test", "0", "1"],
    ]
    write_csv(tmp_path / "meta/labels.csv", ["file", "patient", "view", "fold", "Effusion", "Mass"], rows)
    touch(tmp_path, "img/1.png")
    touch(tmp_path, "img/2.png")
    src = get_source(
        "folder",
        tmp_path,
        tmp_path / "meta",
        csv="labels.csv",
        path_column="file",
        label_columns=["Effusion", "Mass"],
        patient_column="patient",
        view_column="view",
        split_column="fold",
        source_name="mycxr",
        views="frontal",
    )
    items = list(src.items())
    assert [(i.source, i.relpath, i.patient_id, i.view_position, i.split) for i in items] == [
        ("mycxr", "img/1.png", "p1", "PA", "train")
    ]
    assert src.label_names == ("Effusion", "Mass") and same(items[0].labels, (1.0, NAN))
    assert [m.relpath for m in src.missing] == ["img/3.png"] and src.missing[0].labels == (0.0, 1.0)
    assert (
        len(
            list(
                get_source(
                    "folder", tmp_path, tmp_path / "meta", csv="labels.csv", path_column="file", views="all"
                ).items()
            )
        )
        == 2
    )


def test_find_images_folder_order_extension_preference_and_spelling(tmp_path):
    """The first folder holding a match wins; per stem the first listed extension wins, whatever its case;
    other names, extensions and subfolders are ignored; the most common on-disk spelling is reported."""
    import re

    from etils import epath

    pattern = re.compile(r"IMG(\d{3})", re.IGNORECASE)
    for name in ("images/IMG001.PNG", "images/IMG001.jpg", "images/img002.png", "images/IMG003.png",
                 "images/IMG004.tif", "images/notes.png", "images/sub/IMG005.png", "IMG009.png"):  # fmt: skip
        touch(tmp_path, name)
    root = epath.Path(tmp_path)
    folder, found, spelled = base_mod.find_images(root, ("absent", "images", ""), pattern, (".png", ".jpg"), str.upper)
    assert folder == "images"
    assert found == {"IMG001": "images/IMG001.PNG", "IMG002": "images/img002.png", "IMG003": "images/IMG003.png"}
    assert spelled == ".png"  # two .png, one .PNG, one .jpg
    jpg_first = base_mod.find_images(root, ("images",), pattern, (".jpg", ".png"))[1]
    assert jpg_first["IMG001"] == "images/IMG001.jpg" and "img002" in jpg_first  # key defaults to the stem as is
    assert base_mod.find_images(root, ("",), pattern, (".png",))[:2] == ("", {"IMG009": "IMG009.png"})
    assert base_mod.find_images(root, ("absent", "images/sub/x"), pattern, (".png",)) == ("absent", {}, "")
