"""A generic source: every image under a folder, or the rows of a CSV naming images under it.

Folder mode (no `csv`): files ending in `extensions` (png, jpg, jpeg, dcm, dicom; case-insensitive) under the
root, recursively, in sorted order. There is no metadata, so nothing is missing and labels are empty. A DICOM
tells its own view (ViewPosition, else its View Code Sequence): under a view filter its header, not its pixels,
is read while listing, so a lateral DICOM is left out of a frontal build and counted as view-filtered, like a
lateral row of a CSV source. A PNG/JPEG has no view: it is kept (as is a DICOM whose header names none).
CSV mode (`csv`, a path, relative paths taken under `metadata`, default the root): one row per image;
`path_column` holds the image path relative to the root; `label_columns` (in that order) are parsed as
CheXpert-style cells (1, 0, -1 uncertain, blank NaN); `patient_column`, `study_column`, `view_column` and
`split_column` are optional. A row whose file is absent is reported in `missing`.
"""

from collections.abc import Iterator, Sequence
from concurrent import futures

from etils import epath

from data_prep.sources.base import Source, SourceItem, clean_relpath, label_vector, read_csv

EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")
_HEADER_THREADS = 16  # header reads are I/O bound (remote on gs://)


class Folder(Source):
    name = "folder"
    KEEP_UNKNOWN_VIEW = True

    def __init__(
        self,
        root: str | epath.PathLike,
        metadata: str | epath.PathLike | None = None,
        *,
        csv: str | epath.PathLike | None = None,
        path_column: str = "path",
        label_columns: Sequence[str] = (),
        patient_column: str | None = None,
        study_column: str | None = None,
        view_column: str | None = None,
        split_column: str | None = None,
        extensions: Sequence[str] = EXTENSIONS,
        source_name: str = "folder",
        **options,
    ):
        super().__init__(root, metadata, **options)
        self.csv = None if csv is None else self.metadata / csv
        self.path_column = path_column
        self.label_names = tuple(label_columns)
        self.columns = {
            "patient_id": patient_column,
            "study_id": study_column,
            "view_position": view_column,
            "split": split_column,
        }
        self.extensions = tuple(e.lower() for e in extensions)
        self.name = source_name

    def candidates(self) -> Iterator[SourceItem]:
        if self.csv is None:
            yield from self._walk()
            return
        if not self.csv.is_file():
            raise FileNotFoundError(f"no CSV at {self.csv}")
        for row in read_csv(self.csv):
            relpath = clean_relpath(row[self.path_column])
            fields = {field: row.get(column, "").strip() if column else "" for field, column in self.columns.items()}
            yield self.item(
                relpath,
                image_id=relpath.rsplit(".", 1)[0],
                labels=label_vector(row, self.label_names),
                **fields,
            )

    def _walk(self) -> Iterator[SourceItem]:
        paths = [p for p in sorted(walk_files(self.root), key=str) if p.name.lower().endswith(self.extensions)]
        for path, view in zip(paths, self._header_views(paths), strict=True):
            relpath = str(path.relative_to(self.root))
            yield self.item(relpath, image_id=relpath.rsplit(".", 1)[0], view_position=view)

    def _header_views(self, paths: Sequence[epath.Path]) -> list[str]:
        """Each file's view from its DICOM header; "" for PNG/JPEG, and for all when no view filter needs it."""
        dicoms = [p for p in paths if p.name.lower().endswith(DICOM_EXTENSIONS)] if self.views is not None else []
        if not dicoms:
            return [""] * len(paths)
        from data_prep import decode_dicom  # pydicom, loaded only by a listing that reads headers

        with futures.ThreadPoolExecutor(min(_HEADER_THREADS, len(dicoms))) as pool:
            views = dict(zip(dicoms, pool.map(decode_dicom.read_view, dicoms), strict=True))
        return [views.get(p, "") for p in paths]


def walk_files(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file under `folder`, recursively (epath's GCS-backed paths refuse `**` globs)."""
    for path in folder.iterdir():
        if path.is_dir():
            yield from walk_files(path)
        else:
            yield path
