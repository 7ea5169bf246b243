"""VinDr-CXR (PhysioNet, v1.0.0).

Layout: the root holds train/<image_id>.dicom (15,000), test/<image_id>.dicom (3,000) and
    annotations/image_labels_train.csv: image_id, rad_id, then 28 binary label columns (22 local findings,
        6 global diagnoses, in VINDR_LABELS order); one row per (image, radiologist), 3 radiologists per image.
    annotations/image_labels_test.csv: image_id and the same label columns, one consensus row per image
        (5 radiologists); a rad_id column, if present, is ignored.
    (annotations/annotations_{train,test}.csv hold the boxes and are not used here.)
`metadata`, when given, is the folder holding the image_labels CSVs (default <root>/annotations).
Aggregation of the training readers: `aggregate="majority"` (default: positive when more than half of the
readers marked it, so the 3-reader training labels approximate the consensus used on the test set) or "any"
(positive when any reader did). Labels are 0/1; a label column absent from a CSV is NaN. Header names are
matched case-insensitively (the test CSV is reported to spell "Other disease" without the s). Splits: "train"
or "test". The release has no patient id (anonymized; patient_id = ""), each image is its own study, and no
view column: the dataset is documented as adult posteroanterior radiographs, so unknown views are kept by
default and view_position is "" (the DICOM header may say more; it is not read here).
"""

from collections.abc import Iterator

from etils import epath

from data_prep.sources.base import UNKNOWN, Source, SourceItem, find_file, read_csv

SPLITS = ("train", "test")
AGGREGATES = ("majority", "any")
ID_COLUMNS = ("image_id", "rad_id")
ALIASES = {"other disease": "other diseases"}
VINDR_LABELS = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
)


def _key(name: str) -> str:
    key = " ".join(name.strip().lower().split())
    return ALIASES.get(key, key)


def column_map(header: list[str], names: tuple[str, ...]) -> dict[str, str | None]:
    """label name -> CSV column (None when absent); an unknown label column is an error, not dropped."""
    by_key = {_key(column): column for column in header if column not in ID_COLUMNS}
    wanted = {_key(name) for name in names}
    unknown = sorted(column for key, column in by_key.items() if key not in wanted)
    if unknown:
        raise ValueError(f"unknown VinDr-CXR label columns {unknown}")
    return {name: by_key.get(_key(name)) for name in names}


def aggregate(rows: list[dict[str, str]], columns: dict[str, str | None], how: str) -> tuple[float, ...]:
    """One label vector from the readers' rows."""
    out = []
    for column in columns.values():
        if column is None:
            out.append(UNKNOWN)
            continue
        votes = [float(row[column]) for row in rows if (row.get(column) or "").strip()]
        if not votes:
            out.append(UNKNOWN)
        elif how == "any":
            out.append(float(any(v > 0 for v in votes)))
        else:
            out.append(float(sum(v > 0 for v in votes) * 2 > len(votes)))
    return tuple(out)


class VinDrCxr(Source):
    name = "vindr_cxr"
    label_names = VINDR_LABELS
    KEEP_UNKNOWN_VIEW = True

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        aggregate: str = "majority",
        **options,
    ):
        super().__init__(root, metadata, **options)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.aggregate = aggregate
        self.annotations = self.metadata / "annotations" if metadata is None else self.metadata

    def candidates(self) -> Iterator[SourceItem]:
        for split in SPLITS:
            rows = list(read_csv(find_file(self.annotations, f"image_labels_{split}.csv")))
            if not rows:
                continue
            columns = column_map(list(rows[0]), self.label_names)
            by_image: dict[str, list[dict[str, str]]] = {}
            for row in rows:
                by_image.setdefault(row["image_id"].strip(), []).append(row)
            for image_id, readers in by_image.items():
                yield self.item(
                    f"{split}/{image_id}.dicom",
                    study_id=image_id,
                    image_id=image_id,
                    split=split,
                    labels=aggregate(readers, columns, self.aggregate),
                )
