"""The NLM tuberculosis sets: Shenzhen (ChinaSet_AllFiles) and Montgomery County (MontgomerySet).

Layout (both as distributed by the U.S. National Library of Medicine): the root is ChinaSet_AllFiles/ or
MontgomerySet/, holding
    CXR_png/CHNCXR_0001_0.png ... (Shenzhen: 662 images, 326 normal, 336 TB)
    CXR_png/MCUCXR_0001_0.png ... (Montgomery: 138 images, 80 normal, 58 TB; numbers are not contiguous)
    ClinicalReadings/<same stem>.txt: sex, age and the reading ("normal" or the TB findings), not parsed here
    (Montgomery also ManualMask/leftMask/ and rightMask/, lung masks with the image names: never listed)
File names are <PREFIX>_<4-digit number>_<0 normal | 1 tuberculosis>. Mirrors that flattened the folders are
read too: the images are looked for in `image_dir` (default: CXR_png/, else images/, else the root itself)
with extension .png (or .jpg/.jpeg), and only names of that pattern are listed. `metadata` (default the root)
holds ClinicalReadings/; a reading whose image is absent is reported in `missing`.
Labels: ("Tuberculosis",), 1.0 for the _1 suffix, else 0.0. One image per patient, so patient_id is the
number ("0001") and study_id = image_id = the stem. No official split (""). No view column: both sets are
documented as posteroanterior radiographs, so unknown views are kept by default and view_position is "".
"""

import re
from collections.abc import Iterator

from etils import epath

from data_prep.sources.base import Source, SourceItem, find_images

IMAGE_DIRS = ("CXR_png", "images", "")
READINGS_DIR = "ClinicalReadings"
EXTENSIONS = (".png", ".jpg", ".jpeg")


class NlmTuberculosis(Source):
    """Shared lister of the two NLM TB sets; subclasses set `name` and `PREFIX`."""

    PREFIX = ""
    label_names = ("Tuberculosis",)
    KEEP_UNKNOWN_VIEW = True

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        image_dir: str | None = None,
        **options,
    ):
        super().__init__(root, metadata, **options)
        self.image_dir = image_dir
        self.pattern = re.compile(rf"{self.PREFIX}_(\d{{4}})_([01])")

    def images(self) -> tuple[str, dict[str, str]]:
        """(image folder relative to the root, {stem: relpath}) of the pattern's images, first extension wins."""
        folders = (self.image_dir,) if self.image_dir is not None else IMAGE_DIRS
        folder, found, _ = find_images(self.root, folders, self.pattern, EXTENSIONS)
        return folder, found

    def readings(self) -> set[str]:
        """Stems of the clinical readings (empty when the folder is absent)."""
        folder = self.metadata / READINGS_DIR
        if not folder.is_dir():
            return set()
        stems = (child.name.rpartition(".")[0] for child in folder.iterdir() if child.name.lower().endswith(".txt"))
        return {stem for stem in stems if self.pattern.fullmatch(stem)}

    def candidates(self) -> Iterator[SourceItem]:
        folder, images = self.images()
        readings = self.readings()
        if not images and not readings:
            raise FileNotFoundError(
                f"no {self.PREFIX}_NNNN_[01] images in {self.root} ({', '.join(f or '.' for f in IMAGE_DIRS)}) "
                f"and no {READINGS_DIR}/ in {self.metadata}"
            )
        for stem in sorted(images.keys() | readings):
            number, tb = self.pattern.fullmatch(stem).groups()  # type: ignore[union-attr]
            relpath = images.get(stem) or (f"{folder}/{stem}.png" if folder else f"{stem}.png")
            yield self.item(relpath, patient_id=number, study_id=stem, image_id=stem, labels=(float(tb),))


class Shenzhen(NlmTuberculosis):
    """Shenzhen No.3 People's Hospital set (ChinaSet_AllFiles)."""

    name = "shenzhen"
    PREFIX = "CHNCXR"


class Montgomery(NlmTuberculosis):
    """Montgomery County, Maryland set (MontgomerySet)."""

    name = "montgomery"
    PREFIX = "MCUCXR"
