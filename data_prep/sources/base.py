"""What every dataset adapter shares: the listed item, view filtering, missing-file reporting, CSV helpers.

An adapter only lists: it turns a release's metadata CSVs into `SourceItem`s (path, ids, view, official split,
labels) and never decodes an image (the folder source, having no CSV, reads the view from DICOM headers). Rows
whose file is absent on disk are kept aside in `Source.missing` rather than yielded, so a partial download is
reported and nothing is ever invented to fill it.
"""

import abc
import collections
import csv
import dataclasses
import gzip
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

from etils import epath

# The CheXpert labeler's 14 observations in CheXpert's own column order; MIMIC-CXR, CheXpert and BRAX share it.
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
FRONTAL_VIEWS = ("PA", "AP")
UNCERTAIN = -1.0
UNKNOWN = math.nan


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One listed image. `relpath` (relative to the dataset root, POSIX) is the stable id across machines."""

    source: str
    path: epath.Path
    relpath: str
    patient_id: str = ""
    study_id: str = ""
    image_id: str = ""
    view_position: str = ""
    split: str = ""
    labels: tuple[float, ...] = ()  # in the source's label_names order; -1 uncertain, NaN unknown


class Source(abc.ABC):
    """Base adapter. Subclasses set `name`, `label_names` and implement `candidates()`.

    `views`: "frontal" (the source's FRONTAL_VIEWS), None or "all" (every view), or an explicit collection of
    view strings (compared case-insensitively). `keep_unknown_view`: whether an item with no view metadata
    passes a view filter; defaults to the class's KEEP_UNKNOWN_VIEW (True only where a release has no view
    column but documents frontal-only content, or for generic folders).
    """

    name: ClassVar[str] = ""
    label_names: tuple[str, ...] = ()
    FRONTAL_VIEWS: ClassVar[tuple[str, ...]] = FRONTAL_VIEWS
    KEEP_UNKNOWN_VIEW: ClassVar[bool] = False

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        views: str | Iterable[str] | None = "frontal",
        keep_unknown_view: bool | None = None,
    ):
        self.root = epath.Path(root)
        self.metadata = epath.Path(metadata) if metadata is not None else self.root
        if views is None or views == "all":
            self.views: frozenset[str] | None = None
        elif views == "frontal":
            self.views = frozenset(v.upper() for v in self.FRONTAL_VIEWS)
        elif isinstance(views, str):
            raise ValueError(f"views must be 'frontal', 'all', None or a collection of views, got {views!r}")
        else:
            self.views = frozenset(v.upper() for v in views)
        self.keep_unknown_view = self.KEEP_UNKNOWN_VIEW if keep_unknown_view is None else keep_unknown_view
        self.missing: list[SourceItem] = []
        self.view_filtered = 0  # listed images dropped by the view filter in the last items() pass

    @abc.abstractmethod
    def candidates(self) -> Iterator[SourceItem]:
        """Every image the metadata lists, whatever its view and whether or not its file exists."""

    def keep_view(self, view: str) -> bool:
        if self.views is None:
            return True
        if not view:
            return self.keep_unknown_view
        return view.upper() in self.views

    def items(self) -> Iterator[SourceItem]:
        """Listed images of the allowed views whose file exists; the absent ones go to `self.missing`.

        Every candidate is accounted for: yielded, counted in `view_filtered`, or kept in `missing`.
        """
        self.missing = []
        self.view_filtered = 0
        for item in self.candidates():
            if not self.keep_view(item.view_position):
                self.view_filtered += 1
                continue
            if self.exists(item):
                yield item
            else:
                self.missing.append(item)

    def exists(self, item: SourceItem) -> bool:
        return item.path.is_file()

    def item(self, relpath: str, **fields: object) -> SourceItem:
        """A SourceItem of this source at `relpath` under the root."""
        relpath = clean_relpath(relpath)
        return SourceItem(source=self.name, path=self.root / relpath, relpath=relpath, **fields)  # type: ignore[arg-type]


def clean_relpath(relpath: str) -> str:
    """A CSV path as a POSIX path relative to the root: no backslashes, leading "/" or "./"."""
    relpath = relpath.strip().replace("\\", "/")
    while relpath.startswith(("/", "./")):
        relpath = relpath[1:] if relpath.startswith("/") else relpath[2:]
    return relpath


def find_file(directory: epath.Path, *names: str) -> epath.Path:
    """The first of `names` (or its .gz) present in `directory`; a missing metadata file is an error, not empty."""
    tried = []
    for name in names:
        for candidate in (name, name + ".gz") if not name.endswith(".gz") else (name,):
            path = directory / candidate
            tried.append(candidate)
            if path.is_file():
                return path
    raise FileNotFoundError(f"none of {tried} in {directory}")


def find_images(
    root: epath.Path,
    folders: Sequence[str],
    pattern: re.Pattern[str],
    extensions: Sequence[str],
    key: Callable[[str], str] = str,
) -> tuple[str, dict[str, str], str]:
    """Images named `<stem>.<ext>` (stem matching `pattern`, ext one of the lower-case `extensions`, any case)
    in the first of `folders` (relative to the root, "" = the root itself) that holds any.

    For releases listed from their file names rather than a CSV. Returns (that folder, {key(stem): relpath}
    where the first of `extensions` wins for a stem present several times, the folder's most common extension
    as spelled on disk); (folders[0], {}, "") when none holds one.
    """
    for folder in folders:
        path = root / folder if folder else root
        if not path.is_dir():
            continue
        by_key: dict[str, dict[str, str]] = {}
        spellings: collections.Counter[str] = collections.Counter()
        for child in path.iterdir():
            stem, dot, ext = child.name.rpartition(".")
            if dot and pattern.fullmatch(stem) and "." + ext.lower() in extensions:
                by_key.setdefault(key(stem), {})["." + ext.lower()] = f"{folder}/{child.name}" if folder else child.name
                spellings["." + ext] += 1
        if by_key:
            found = {k: next(exts[e] for e in extensions if e in exts) for k, exts in by_key.items()}
            return folder, found, spellings.most_common(1)[0][0]
    return folders[0], {}, ""


def read_csv(path: epath.Path, delimiter: str = ",") -> Iterator[dict[str, str]]:
    """Rows of a CSV (gzip-compressed if it ends in .gz) as dicts; a UTF-8 BOM is dropped."""
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        yield from csv.DictReader(text, delimiter=delimiter)


def read_lines(path: epath.Path) -> list[str]:
    """Non-empty stripped lines of a text file (split lists)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parse_label(value: str | None) -> float:
    """CheXpert-style cell: "1"/"1.0" positive, "0" negative, "-1" uncertain, blank unknown (NaN)."""
    value = (value or "").strip()
    if not value or value.lower() == "nan":
        return UNKNOWN
    return float(value)


def label_vector(row: Mapping[str, str] | None, names: Sequence[str]) -> tuple[float, ...]:
    """Labels of `row` in `names` order; an absent row or column is unknown."""
    if row is None:
        return (UNKNOWN,) * len(names)
    return tuple(parse_label(row.get(name)) for name in names)


def multi_hot(present: Iterable[str], names: Sequence[str]) -> tuple[float, ...]:
    """1.0 for each name present, 0.0 otherwise (sources whose absence of a finding means negative)."""
    found = set(present)
    return tuple(1.0 if name in found else 0.0 for name in names)
