"""CXR-LT 2024 task 1 (PhysioNet "cxr-lt-iccv-workshop-cvamd" 2.0.0): 40 long-tailed findings on MIMIC-CXR-JPG.

Images: the root is the MIMIC-CXR-JPG release folder (2.0.0 or 2.1.0; a copy with the same tree, such as a
pre-resized one, works too):
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
Label CSVs, under `metadata` (default the root) or its cxr-lt-2024/ or task1_development_starting_kit/ folder:
    train_labeled.csv                                   split "train" (258,871 rows in 2.0.0; required)
    development_labeled_task1.csv, else development_task1.csv or development.csv    split "development"
    test_labeled_task1.csv, else test_task1.csv or test.csv                         split "test"
The development and test files are optional (absent -> not listed). 2.0.0 columns: dicom_id, subject_id,
study_id, ViewPosition (blank for about 4 % of rows), ViewCodeSequence_CodeMeaning, fpath (relative to the
MIMIC-CXR-JPG root, e.g. files/p10/p10000032/s50414267/<dicom_id>.jpg), then the 40 classes as 0/1.
Other CSVs: `csv` names one file (its split from `split`, else from its name: train*, dev*, test*, else "") or
a {split: file} mapping; `path_column` names the image path column (default fpath, else path, else the MIMIC
path built from subject_id, study_id and dicom_id). subject/study ids written as p10000032/s50414267 are
stored without the letter, like the MIMIC-CXR adapter stores them; without id columns they come from the path.

Labels: the 40 task-1 classes in the order of the released CheXFound head (CXR_LT_LABELS); each CSV column is
matched to a class by its name lower-cased without spaces or punctuation, so "Round(ed) Atelectasis",
"Rounded Atelectasis" and "rounded_atelectasis" are one class ("Round Atelectasis" too). Cells are parsed like
CheXpert's (1, 0, -1, blank NaN). A CSV with none of the class columns (an unlabelled development or test file)
gets NaN labels; one with only some of them is an error naming the absent classes, and so is a train CSV with
none. Columns for other classes (labels.csv's 45) are ignored.
image_id is dicom_id (the id the challenge's prediction CSV uses). Views: ViewPosition; a CSV without that
column takes the views of mimic-cxr-2.0.0-metadata.csv(.gz) when the metadata folder or the root holds it,
else views are unknown. Note that the default frontal filter drops laterals and unknown views, while the
CheXFound CXR-LT splits (207,096 + 51,775 = all 258,871 train rows) keep every view: pass views="all" for that.
"""

import csv as csv_module
import gzip
import io
import re
from collections.abc import Iterator, Mapping, Sequence

from etils import epath

from data_prep.sources.base import UNKNOWN, Source, SourceItem, clean_relpath, find_file, parse_label, read_csv

# The 40 CXR-LT 2024 task-1 classes in the order of the released CheXFound head (alphabetical).
CXR_LT_LABELS = (
    "Adenopathy",
    "Atelectasis",
    "Azygos Lobe",
    "Calcification of the Aorta",
    "Cardiomegaly",
    "Clavicle Fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged Cardiomediastinum",
    "Fibrosis",
    "Fissure",
    "Fracture",
    "Granuloma",
    "Hernia",
    "Hydropneumothorax",
    "Infarction",
    "Infiltration",
    "Kyphosis",
    "Lobar Atelectasis",
    "Lung Lesion",
    "Lung Opacity",
    "Mass",
    "Nodule",
    "Normal",
    "Pleural Effusion",
    "Pleural Other",
    "Pleural Thickening",
    "Pneumomediastinum",
    "Pneumonia",
    "Pneumoperitoneum",
    "Pneumothorax",
    "Pulmonary Embolism",
    "Pulmonary Hypertension",
    "Rib Fracture",
    "Round(ed) Atelectasis",
    "Subcutaneous Emphysema",
    "Support Devices",
    "Tortuous Aorta",
    "Tuberculosis",
)
# Official file names per split, preferred first (2.0.0's labelled files, then the challenge-phase ones).
SPLIT_FILES = {
    "train": ("train_labeled.csv",),
    "development": ("development_labeled_task1.csv", "development_task1.csv", "development.csv"),
    "test": ("test_labeled_task1.csv", "test_task1.csv", "test.csv"),
}
SUBFOLDERS = ("", "cxr-lt-2024", "task1_development_starting_kit")
PATH_COLUMNS = ("fpath", "path")
ALIASES = {"roundatelectasis": "roundedatelectasis"}
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"


def column_key(name: str) -> str:
    """A header cell or class name reduced to lower-case letters and digits, aliases resolved."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return ALIASES.get(key, key)


def match_label_columns(header: Sequence[str], names: Sequence[str], where: str) -> dict[str, str]:
    """{class name: CSV column} for every class; {} when the header has none of them; else ValueError."""
    wanted = {column_key(name): name for name in names}
    found: dict[str, str] = {}
    for column in header:
        name = wanted.get(column_key(column))
        if name is None:
            continue
        if name in found:
            raise ValueError(f"{where}: columns {found[name]!r} and {column!r} both match class {name!r}")
        found[name] = column
    absent = [name for name in names if name not in found]
    if found and absent:
        raise ValueError(f"{where}: no column for class(es) {absent}")
    return found


def split_from_name(filename: str) -> str:
    """The split a CXR-LT CSV's file name implies ("" when it implies none)."""
    name = filename.rsplit("/", 1)[-1].lower()
    for prefix, split in (("train", "train"), ("dev", "development"), ("test", "test")):
        if name.startswith(prefix):
            return split
    return ""


def strip_prefix(value: str, letter: str) -> str:
    """p10000032 -> 10000032 (MIMIC folder-style ids); anything else unchanged."""
    value = value.strip()
    return value[1:] if len(value) > 1 and value[0].lower() == letter and value[1:].isdigit() else value


def ids_from_path(relpath: str) -> tuple[str, str]:
    """(subject, study) from a MIMIC path .../p<subject>/s<study>/<dicom>.jpg; "" where the path has none."""
    parts = relpath.split("/")
    study = parts[-2] if len(parts) >= 2 and re.fullmatch(r"s\d+", parts[-2]) else ""
    subject = parts[-3] if study and len(parts) >= 3 and re.fullmatch(r"p\d+", parts[-3]) else ""
    return subject[1:], study[1:]


class CxrLt(Source):
    """CXR-LT 2024 task 1; `csv`/`split`/`path_column` read other CSV arrangements (see the module doc)."""

    name = "cxr_lt"
    label_names = CXR_LT_LABELS
    EXT = ".jpg"

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        csv: str | Mapping[str, str] | None = None,
        split: str | None = None,
        path_column: str | None = None,
        **options,
    ):
        super().__init__(root, metadata, **options)
        if isinstance(csv, Mapping):
            if split is not None:
                raise ValueError("split applies to a single csv, not to a {split: csv} mapping")
            self.csvs: dict[str, str] | None = dict(csv)
        elif csv is not None:
            self.csvs = {split_from_name(csv) if split is None else split: csv}
        else:
            self.csvs = None
        self.path_column = path_column
        self._views: dict[str, str] | None = None

    def label_files(self) -> list[tuple[str, epath.Path]]:
        """(split, CSV) pairs to read, in split order; the official train file must exist."""
        if self.csvs is not None:
            files = [(split, self.metadata / name) for split, name in self.csvs.items()]
            for split, path in files:
                if not path.is_file():
                    raise FileNotFoundError(f"no CXR-LT CSV at {path} (split {split!r})")
            return files
        folders = [self.metadata / sub if sub else self.metadata for sub in SUBFOLDERS]
        files = []
        for split, names in SPLIT_FILES.items():
            path = next((found for folder in folders if (found := _first_file(folder, names))), None)
            if path is None and split == "train":
                raise FileNotFoundError(f"none of {list(names)} in {[str(f) for f in folders]}")
            if path is not None:
                files.append((split, path))
        return files

    def mimic_views(self) -> dict[str, str]:
        """dicom_id -> ViewPosition from MIMIC-CXR-JPG's metadata table, {} when neither folder holds it."""
        if self._views is None:
            self._views = {}
            for folder in (self.metadata, self.root):
                try:
                    path = find_file(folder, MIMIC_METADATA)
                except FileNotFoundError:
                    continue
                self._views = {row["dicom_id"]: row.get("ViewPosition", "").strip() for row in read_csv(path)}
                break
        return self._views

    def candidates(self) -> Iterator[SourceItem]:
        for split, path in self.label_files():
            yield from self._rows(split, path)

    def _rows(self, split: str, path: epath.Path) -> Iterator[SourceItem]:
        header = _header(path)
        where = str(path)
        columns = match_label_columns(header, self.label_names, where)
        if not columns and split == "train":
            raise ValueError(f"{where}: a train CSV needs the class columns; found none of {list(self.label_names)}")
        path_column = self._path_column(header, where)
        has_view = "ViewPosition" in header
        views = {} if has_view else self.mimic_views()
        for line, row in enumerate(read_csv(path), start=2):
            dicom = (row.get("dicom_id") or "").strip()
            subject = strip_prefix(row.get("subject_id") or "", "p")
            study = strip_prefix(row.get("study_id") or "", "s")
            if path_column:
                relpath = clean_relpath(row.get(path_column) or "")
                if not relpath:
                    raise ValueError(f"{where} line {line}: empty {path_column!r}")
            else:
                relpath = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}{self.EXT}"
            from_path = ids_from_path(relpath)
            dicom = dicom or relpath.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            view = (row.get("ViewPosition") or "").strip() if has_view else views.get(dicom, "")
            if columns:
                labels = tuple(_cell(row, columns[name], where, line) for name in self.label_names)
            else:
                labels = (UNKNOWN,) * len(self.label_names)
            yield self.item(
                relpath,
                patient_id=subject or from_path[0],
                study_id=study or from_path[1],
                image_id=dicom,
                view_position=view,
                split=split,
                labels=labels,
            )

    def _path_column(self, header: Sequence[str], where: str) -> str | None:
        """The image path column; None to build MIMIC paths from the ids (which must then be there)."""
        if self.path_column is not None:
            if self.path_column not in header:
                raise ValueError(f"{where}: no path column {self.path_column!r} (header: {list(header)})")
            return self.path_column
        for column in PATH_COLUMNS:
            if column in header:
                return column
        absent = [c for c in ("subject_id", "study_id", "dicom_id") if c not in header]
        if absent:
            raise ValueError(f"{where}: no path column ({' or '.join(PATH_COLUMNS)}) and no {absent} to build one")
        return None


def _cell(row: Mapping[str, str], column: str, where: str, line: int) -> float:
    try:
        return parse_label(row.get(column))
    except ValueError:
        raise ValueError(f"{where} line {line}: {column!r} is {row.get(column)!r}, not a label") from None


def _first_file(folder: epath.Path, names: Sequence[str]) -> epath.Path | None:
    try:
        return find_file(folder, *names)
    except FileNotFoundError:
        return None


def _header(path: epath.Path) -> list[str]:
    """The CSV's column names, read on their own so that a file without rows is checked too."""
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        return next(csv_module.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")), [])
