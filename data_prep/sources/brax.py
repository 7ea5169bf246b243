"""BRAX, the Brazilian labeled chest X-ray dataset (PhysioNet, v1.1.0 layout as best known).

Layout: the root holds master_spreadsheet_update.csv and the image trees that its DicomPath and PngPath columns
point to (paths relative to the root, e.g. "images/<patient>/<accession>/<image>.png"; a leading "./" or "/" is
ignored). Columns used: PngPath or DicomPath (chosen by `image_format`), PatientID, AccessionNumber (the
study), ViewPosition, and the 14 CheXpert observations under CheXpert's column names. Labels come from the
CheXpert labeler run on Portuguese reports: 1, 0, -1 (uncertain) or blank (NaN). No official split.
Unsure: the exact folder naming under images/, whether ViewPosition is blank for some images (blank views
are dropped by the default frontal filter), and whether the release contains any lateral views at all;
image_id is the file stem because no per-image id column is known.
"""

from collections.abc import Iterator

from etils import epath

from data_prep.sources.base import CHEXPERT_LABELS, Source, SourceItem, find_file, label_vector, read_csv

CSV_NAME = "master_spreadsheet_update.csv"
PATH_COLUMNS = {"png": "PngPath", "dicom": "DicomPath"}


class Brax(Source):
    name = "brax"
    label_names = CHEXPERT_LABELS

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        image_format: str = "png",
        **options,
    ):
        super().__init__(root, metadata, **options)
        if image_format not in PATH_COLUMNS:
            raise ValueError(f"image_format must be one of {tuple(PATH_COLUMNS)}, got {image_format!r}")
        self.path_column = PATH_COLUMNS[image_format]

    def candidates(self) -> Iterator[SourceItem]:
        for row in read_csv(find_file(self.metadata, CSV_NAME)):
            relpath = row[self.path_column].strip()
            yield self.item(
                relpath,
                patient_id=row.get("PatientID", "").strip(),
                study_id=row.get("AccessionNumber", "").strip(),
                image_id=relpath.rsplit("/", 1)[-1].rsplit(".", 1)[0],
                view_position=row.get("ViewPosition", "").strip(),
                labels=label_vector(row, self.label_names),
            )
