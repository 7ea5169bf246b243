"""JSRT (Japanese Society of Radiological Technology) standard digital image database of chest radiographs.

Release: 247 PA films digitised at 2048x2048, 0.175 mm pixels, 12 bits: 154 with one lung nodule
(JPCLN001 ... JPCLN154) and 93 without (JPCNN001 ... JPCNN093). The original files are raw .IMG (no header,
big-endian 16-bit words, values growing with film density, so 0 is white; `data_prep.decode_jsrt` reads them) in
All247images/; converted copies with the same base names (.png/.jpg, as the SCR and most mirrors ship them)
work too. The images are looked for in `image_dir` (default: All247images/, else images/, else the root
itself); when a name exists with several extensions the first of `extensions` wins (default: the original .IMG,
then .png, .jpg, .jpeg; case-insensitive). Segmentation masks (SCR's .gif, or masks in other folders) are never
listed. The clinical tables (CLNDAT_EN.txt, CNNDAT_EN.TXT: age, sex, nodule size, position, malignancy) are not
read here.
Every one of the 247 names the release defines is a candidate, so an absent file is reported in `missing`
(at <image_dir>/<name><the folder's most common extension>); files of the same naming beyond those numbers are
listed too. Labels: ("Nodule",), 1.0 for JPCLN, 0.0 for JPCNN. One image per patient: patient_id = study_id
= image_id = the name. No official split (""). No view column; the set is documented as posteroanterior, so
unknown views are kept by default and view_position is "".
"""

import re
from collections.abc import Iterator, Sequence

from etils import epath

from data_prep.sources.base import Source, SourceItem, find_images

IMAGE_DIRS = ("All247images", "images", "")
EXTENSIONS = (".IMG", ".png", ".jpg", ".jpeg")
NODULE_COUNT, NON_NODULE_COUNT = 154, 93
PATTERN = re.compile(r"JPC(LN|NN)(\d{3})", re.IGNORECASE)
JSRT_NAMES = tuple(f"JPCLN{i:03d}" for i in range(1, NODULE_COUNT + 1)) + tuple(
    f"JPCNN{i:03d}" for i in range(1, NON_NODULE_COUNT + 1)
)


class Jsrt(Source):
    name = "jsrt"
    label_names = ("Nodule",)
    KEEP_UNKNOWN_VIEW = True

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        image_dir: str | None = None,
        extensions: Sequence[str] = EXTENSIONS,
        **options,
    ):
        super().__init__(root, metadata, **options)
        self.image_dir = image_dir
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

    def images(self) -> tuple[str, dict[str, str], str]:
        """(image folder, {NAME: relpath}, the folder's most common extension as spelled there)."""
        folders = (self.image_dir,) if self.image_dir is not None else IMAGE_DIRS
        return find_images(self.root, folders, PATTERN, self.extensions, key=str.upper)

    def candidates(self) -> Iterator[SourceItem]:
        folder, images, ext = self.images()
        if not images and not (self.root / folder).is_dir():
            folders = (self.image_dir,) if self.image_dir else IMAGE_DIRS
            where = ", ".join(f"{d}/" if d else "the root" for d in folders)
            raise FileNotFoundError(f"no JSRT images (JPCLNnnn / JPCNNnnn) in {where} of {self.root}")
        missing_ext = ext or _spelled(self.extensions[0])
        for name in sorted(images.keys() | set(JSRT_NAMES)):
            relpath = images.get(name) or (f"{folder}/{name}{missing_ext}" if folder else f"{name}{missing_ext}")
            nodule = PATTERN.fullmatch(name).group(1).upper() == "LN"  # type: ignore[union-attr]
            yield self.item(relpath, patient_id=name, study_id=name, image_id=name, labels=(float(nodule),))


def _spelled(ext: str) -> str:
    """The release's spelling of an extension (.IMG upper-case, converted copies lower-case)."""
    return ".IMG" if ext.lower() == ".img" else ext
