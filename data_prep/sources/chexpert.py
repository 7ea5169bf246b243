"""CheXpert (Stanford), release CheXpert-v1.0 (and the identical-layout CheXpert-v1.0-small).

Layout: the root is the CheXpert-v1.0/ folder holding
    train.csv, valid.csv
    train/patient00001/study1/view1_frontal.jpg, valid/patient64541/study1/view1_frontal.jpg, ...
CSV columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 observations (No Finding ... Support Devices).
Path is prefixed with the release folder ("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"); that
first component is dropped so relpaths are relative to the root. Labels: 1.0, 0.0, -1.0 (uncertain) or blank
(NaN); valid.csv (radiologist consensus) has only 0/1. Split: "train" or "valid" (the CSV it came from); the
later test set (CheXlocalize) is a separate release and not listed here.
View: AP/PA holds AP, PA, LL, RL or blank; a "Lateral" row with a blank AP/PA becomes "LATERAL", a frontal row
with a blank AP/PA keeps an empty view (dropped by the default frontal filter unless keep_unknown_view).
"""

from collections.abc import Iterator

from data_prep.sources.base import CHEXPERT_LABELS, Source, SourceItem, find_file, label_vector, read_csv

SPLITS = ("train", "valid")


def strip_release(path: str) -> str:
    """Drop the leading release folder (CheXpert-v1.0 or CheXpert-v1.0-small) from a CSV Path."""
    head, _, rest = path.strip().lstrip("/").partition("/")
    return rest if head.startswith("CheXpert") else path.strip()


class CheXpert(Source):
    name = "chexpert"
    label_names = CHEXPERT_LABELS

    def candidates(self) -> Iterator[SourceItem]:
        for split in SPLITS:
            for row in read_csv(find_file(self.metadata, f"{split}.csv")):
                relpath = strip_release(row["Path"])
                parts = relpath.split("/")  # <split>/<patient>/<study>/<view>.jpg
                patient = parts[-3] if len(parts) >= 3 else ""
                view = row.get("AP/PA", "").strip()
                if not view and row.get("Frontal/Lateral", "").strip() == "Lateral":
                    view = "LATERAL"
                yield self.item(
                    relpath,
                    patient_id=patient,
                    study_id="/".join(parts[-3:-1]),
                    image_id="/".join(parts[-3:]).rsplit(".", 1)[0],
                    view_position=view,
                    split=split,
                    labels=label_vector(row, self.label_names),
                )
