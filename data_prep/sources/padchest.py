"""PadChest (BIMCV, Hospital San Juan, Alicante), the 160K release of 01.02.19.

Layout: the root holds PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) and the unzipped image folders
0/ ... 54/ (one per zip), each image at <ImageDir>/<ImageID>, a 16-bit grayscale PNG.
CSV columns used: ImageID, ImageDir, PatientID, StudyID, Projection (PA, L, AP, AP_horizontal, COSTAL,
EXCLUDE, UNK), Labels (a Python-list string such as "['pleural effusion', ' cardiomegaly']"; entries may carry
stray spaces; an empty or unparsable cell means unlabeled). Others present but unused: StudyDate_DICOM,
PatientBirth, PatientSex_DICOM, ViewPosition_DICOM, MethodProjection, Localizations, labelCUIS, Report, ...
Views: Projection is kept as is; the frontal set is PA, AP and AP_horizontal (supine AP).
Labels: PadChest has no uncertainty and no official split (split is ""). `findings` picks the vector:
  - a mapping name -> PadChest label strings (default CHEXPERT_LIKE, an approximate CheXpert-14 mapping), a
    finding is 1 when any of its strings is present;
  - a sequence of PadChest label strings, one per class;
  - "present": multi-hot over every label string found in the CSV (sorted).
Any mode gives 1/0 for labeled rows and all-NaN for unlabeled ones. Matching is case-insensitive.
"""

import ast
from collections.abc import Iterator, Mapping, Sequence

from etils import epath

from data_prep.sources.base import UNKNOWN, Source, SourceItem, find_file, read_csv

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
# Approximate CheXpert observations in PadChest's vocabulary; "Lung Opacity" is the union of opacity patterns.
CHEXPERT_LIKE: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Opacity": (
        "infiltrates",
        "alveolar pattern",
        "interstitial pattern",
        "reticular interstitial pattern",
        "ground glass pattern",
        "consolidation",
    ),
    "Lung Lesion": ("nodule", "multiple nodules", "pulmonary mass", "mass"),
    "Edema": ("pulmonary edema",),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": (
        "atelectasis",
        "laminar atelectasis",
        "lobar atelectasis",
        "segmental atelectasis",
        "total atelectasis",
        "round atelectasis",
    ),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion", "hydropneumothorax"),
    "Pleural Other": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Fracture": ("fracture", "rib fracture", "clavicle fracture", "humeral fracture", "vertebral fracture"),
    "Support Devices": (
        "NSG tube",
        "endotracheal tube",
        "tracheostomy tube",
        "central venous catheter",
        "central venous catheter via jugular vein",
        "central venous catheter via subclavian vein",
        "PICC",
        "chest drain tube",
        "pacemaker",
        "dual chamber device",
        "single chamber device",
        "electrical device",
    ),
}


def parse_labels(cell: str | None) -> list[str] | None:
    """The label strings of a Labels cell, lower-cased and stripped; None when the row is unlabeled."""
    cell = (cell or "").strip()
    if not cell or cell.lower() == "nan":
        return None
    try:
        values = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(values, list | tuple):
        return None
    labels = [str(v).strip().lower() for v in values]
    return [label for label in labels if label]


class PadChest(Source):
    name = "padchest"
    FRONTAL_VIEWS = ("PA", "AP", "AP_horizontal")

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        findings: Mapping[str, Sequence[str]] | Sequence[str] | str = CHEXPERT_LIKE,
        csv_name: str = CSV_NAME,
        **options,
    ):
        super().__init__(root, metadata, **options)
        self.csv_name = csv_name
        if isinstance(findings, str):
            if findings != "present":
                raise ValueError(f"findings must be a mapping, a sequence or 'present', got {findings!r}")
            self.groups: dict[str, frozenset[str]] | None = None
            self.label_names = ()
        else:
            if not isinstance(findings, Mapping):
                findings = {name: (name,) for name in findings}
            self.groups = {name: frozenset(s.strip().lower() for s in strings) for name, strings in findings.items()}
            self.label_names = tuple(self.groups)

    def rows(self) -> list[dict[str, str]]:
        return list(read_csv(find_file(self.metadata, self.csv_name)))

    def candidates(self) -> Iterator[SourceItem]:
        rows = self.rows()
        parsed = [parse_labels(row.get("Labels")) for row in rows]
        if self.groups is None:  # "present": vocabulary from the CSV itself
            self.label_names = tuple(sorted({label for labels in parsed if labels for label in labels}))
            groups = {name: frozenset((name,)) for name in self.label_names}
        else:
            groups = self.groups
        for row, labels in zip(rows, parsed):
            if labels is None:
                vector = (UNKNOWN,) * len(groups)
            else:
                found = set(labels)
                vector = tuple(1.0 if found & strings else 0.0 for strings in groups.values())
            image_id = row["ImageID"].strip()
            yield self.item(
                f"{row['ImageDir'].strip()}/{image_id}",
                patient_id=row.get("PatientID", "").strip(),
                study_id=row.get("StudyID", "").strip(),
                image_id=image_id.rsplit(".", 1)[0],
                view_position=row.get("Projection", "").strip(),
                labels=vector,
            )
