"""NIH ChestX-ray14 (NIH Clinical Center, Box release of 2017 with the 2020 label file).

Layout: the root holds Data_Entry_2017_v2020.csv (preferred) or Data_Entry_2017.csv, train_val_list.txt,
test_list.txt, and the PNGs either as extracted from images_001.tar.gz ... images_012.tar.gz (each unpacks to
images/, so a merged flat images/) or as the Kaggle mirror's images_001/images/ ... images_012/images/.
CSV columns: Image Index (00000001_000.png = <Patient ID>_<Follow-up #>), Finding Labels ("A|B" or
"No Finding"), Follow-up #, Patient ID, Patient Age, Patient Gender, View Position (PA or AP),
OriginalImage[Width,Height], OriginalImagePixelSpacing[x,y]. The bracketed headers contain a comma, so a CSV
reader sees them split ("OriginalImage[Width", "Height]", ...); only the first seven columns are used.
Labels: the 14 findings and "No Finding", 1 when named in Finding Labels else 0 (NLP-mined, no uncertainty;
the official dataset's binarizer keeps "No Finding" as a 15th column). Split: "train_val"
or "test" from the official lists ("" when the lists are absent); there is no official validation split.
Each image is its own study (study_id = image stem).
"""

from collections.abc import Iterator

from etils import epath

from data_prep.sources.base import Source, SourceItem, find_file, multi_hot, read_csv, read_lines

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"


def image_index(root: epath.Path) -> dict[str, str]:
    """Image file name -> relpath, over images/ and images_NNN/images/ (listing once beats 112k stat calls)."""
    index: dict[str, str] = {}
    if not root.is_dir():
        return index
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not (folder.name == "images" or folder.name.startswith("images_")):
            continue
        for sub in (folder, folder / "images"):
            if sub.is_dir():
                for path in sub.iterdir():
                    if path.name.endswith(".png"):
                        index.setdefault(path.name, str(path.relative_to(root)))
    return index


class NihChestXray14(Source):
    name = "nih_cxr14"
    label_names = (*NIH_LABELS, NO_FINDING)

    def splits(self) -> dict[str, str]:
        out = {}
        for split, filename in SPLIT_FILES.items():
            path = self.metadata / filename
            if path.is_file():
                out.update(dict.fromkeys(read_lines(path), split))
        return out

    def candidates(self) -> Iterator[SourceItem]:
        splits = self.splits()
        index = image_index(self.root)
        for row in read_csv(find_file(self.metadata, *CSV_NAMES)):
            name = row["Image Index"].strip()
            findings = [f.strip() for f in row["Finding Labels"].split("|")]
            yield self.item(
                index.get(name, f"images/{name}"),  # an unindexed image is reported missing at images/<name>
                patient_id=row["Patient ID"].strip(),
                study_id=name.rsplit(".", 1)[0],
                image_id=name.rsplit(".", 1)[0],
                view_position=row["View Position"].strip(),
                split=splits.get(name, ""),
                labels=multi_hot(findings, self.label_names),
            )
