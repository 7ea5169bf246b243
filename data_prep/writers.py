"""Shard writers: serialized records -> ArrayRecord or TFRecord shards in a TFDS dataset directory.

Layout (what `tfds.builder_from_directory` and `tfds.data_source(name, data_dir=workdir)` expect):

    <workdir>/<name>/<version>/<name>-<split>.<array_record|tfrecord>-000NN-of-000MM
    <workdir>/<name>/<version>/{dataset_info.json, features.json, metadata.json}

Shard assignment is round robin: item k of a split goes to shard k % num_shards, in order. Every shard
can then be written on its own from the split's item list (items[s::num_shards]) without knowing the
others' output, shards come out balanced, and items sorted by patient spread over all shards.

A shard is written under `<version>/.incomplete/` and renamed to its final name only after it closed
cleanly, so the final name is the completion marker: a crash leaves no file that looks finished, and a
rerun skips finished shards. Records and shards are deterministic, so a rerun rewrites identical bytes.
Remote paths (gs://...) are written to a local temporary file first and then copied, because
ArrayRecord's writer needs a local file.

TFRecord shards are written without TensorFlow (framing: uint64 length, masked crc32c of the length,
data, masked crc32c of the data) and read back by `TFRecordDataSource`, a random-access source for grain.
"""

import bisect
import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, Literal, TypeVar

import google_crc32c
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import naming

FileFormat = Literal["array_record", "tfrecord"]
FILE_FORMATS: tuple[FileFormat, ...] = ("array_record", "tfrecord")
INCOMPLETE_DIR = ".incomplete"
# group_size:1 is what tfds writes: every record is its own chunk, so random reads decode one record.
ARRAY_RECORD_OPTIONS = "group_size:1"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_MASK_DELTA = 0xA282EAD8
T = TypeVar("T")


# --- naming and assignment -------------------------------------------------------------------------


def dataset_dir(workdir: epath.PathLike, name: str, version: str = "1.0.0") -> epath.Path:
    """`<workdir>/<name>/<version>`: the directory tfds treats as one dataset version."""
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if not tfds.core.Version.is_valid(version):
        raise ValueError(f"version must look like 1.0.0, got {version!r}")
    return epath.Path(workdir) / name / version


def _template(ds_dir: epath.PathLike, split: str | None = None, file_format: str | None = None):
    ds_dir = epath.Path(ds_dir)
    return naming.ShardedFileTemplate(
        data_dir=ds_dir, dataset_name=ds_dir.parent.name, split=split, filetype_suffix=file_format
    )


def shard_paths(ds_dir: epath.PathLike, split: str, num_shards: int, file_format: FileFormat) -> list[epath.Path]:
    """Final paths of a split's shards, named by tfds' own filename template."""
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name must be [A-Za-z0-9_]+, got {split!r}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return list(_template(ds_dir, split, file_format).sharded_filepaths(num_shards))


def shard_of(index: int, num_shards: int) -> int:
    """The shard that item `index` of a split goes to (round robin)."""
    return index % num_shards


def shard_items(items: Sequence[T], shard: int, num_shards: int) -> Sequence[T]:
    """The items of shard `shard`, in the order they are written: items[shard::num_shards]."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in [0, {num_shards})")
    return items[shard::num_shards]


def _is_local(path: epath.PathLike) -> bool:
    return "://" not in os.fspath(path)


# --- TFRecord framing ------------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (rotate right by 15, add a constant), so CRCs of CRCs stay strong."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc32c of the length bytes, data, masked crc32c of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated TFRecord file: wanted {n} bytes, got {len(data)}")
    return data


def tfrecord_index(f: IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(data offsets, data lengths) of every record in a TFRecord file; reads only the 12-byte headers."""
    size = f.seek(0, os.SEEK_END)
    offsets, lengths = [], []
    pos = 0
    while pos < size:
        f.seek(pos)
        header = _read_exact(f, 12)
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
            raise ValueError(f"corrupt TFRecord length at byte {pos}")
        if pos + 12 + length + 4 > size:
            raise ValueError(f"truncated TFRecord: record at byte {pos} runs past the end ({size} bytes)")
        offsets.append(pos + 12)
        lengths.append(length)
        pos += 12 + length + 4
    return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def read_tfrecord_at(f: IO[bytes], offset: int, length: int, verify: bool = True) -> bytes:
    """The record whose data starts at `offset`, its data CRC checked when `verify`."""
    f.seek(offset)
    chunk = _read_exact(f, length + 4)
    data = chunk[:length]
    if verify and struct.unpack("<I", chunk[length:])[0] != masked_crc32c(data):
        raise ValueError(f"corrupt TFRecord data at byte {offset}")
    return data


# --- shard writer ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """A finished shard: what tfds' split info needs (records per shard, bytes)."""

    path: epath.Path
    num_records: int
    num_bytes: int


class _TFRecordFile:
    def __init__(self, path: str):
        self._f = open(path, "wb")  # closed in close()

    def write(self, data: bytes) -> None:
        self._f.write(tfrecord_frame(data))

    def close(self) -> None:
        self._f.close()


class _ArrayRecordFile:
    def __init__(self, path: str):
        self._w = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)

    def write(self, data: bytes) -> None:
        self._w.write(data)

    def close(self) -> None:
        self._w.close()


def _fsync(path: str) -> None:
    """Flushes a local file or directory to disk, so a rename cannot outlive its data after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_format_of(path: epath.PathLike) -> FileFormat:
    """The format named in a shard file name (`...<split>.<format>-000NN-of-000MM`)."""
    info = naming.FilenameInfo.from_str(epath.Path(path).name)
    if info.filetype_suffix not in FILE_FORMATS:
        raise ValueError(f"not an array_record/tfrecord shard name: {path}")
    return info.filetype_suffix  # type: ignore[return-value]


class ShardWriter:
    """Writes one shard; the file gets its final name only when the writer is closed without error.

    Use as a context manager: a clean exit commits (atomic rename into place), an exception discards
    the partial file. A killed process leaves at most a file under `.incomplete/`, never a shard.
    """

    def __init__(self, path: epath.PathLike, file_format: FileFormat | None = None):
        self.path = epath.Path(path)
        self.file_format = file_format or file_format_of(self.path)
        if self.file_format not in FILE_FORMATS:
            raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {self.file_format!r}")
        self.num_records = 0
        self.info: ShardInfo | None = None  # set by close()
        self._staging = self.path.parent / INCOMPLETE_DIR / f"{self.path.name}.{uuid.uuid4().hex}"
        self._staging.parent.mkdir(parents=True, exist_ok=True)
        if _is_local(self.path):
            self._local = os.fspath(self._staging)
        else:
            fd, self._local = tempfile.mkstemp(prefix=f"{self.path.name}.")
            os.close(fd)
        opener = _ArrayRecordFile if self.file_format == "array_record" else _TFRecordFile
        self._file: _ArrayRecordFile | _TFRecordFile | None = opener(self._local)

    def write(self, record: bytes) -> None:
        if self._file is None:
            raise ValueError(f"writer for {self.path} is closed")
        self._file.write(record)
        self.num_records += 1

    def close(self) -> ShardInfo:
        """Finishes the file and moves it to its final name (replacing any earlier copy)."""
        if self._file is None:
            raise ValueError(f"writer for {self.path} is closed")
        self._file.close()
        self._file = None
        num_bytes = os.path.getsize(self._local)
        if _is_local(self.path):
            _fsync(self._local)
            self._staging.replace(self.path)
            _fsync(os.fspath(self.path.parent))
        else:  # object stores: the copy is the upload; the rename publishes it under its final name
            epath.Path(self._local).copy(self._staging, overwrite=True)
            os.remove(self._local)
            self._staging.replace(self.path)
        self.info = ShardInfo(self.path, self.num_records, num_bytes)
        return self.info

    def abort(self) -> None:
        """Drops the partial file; the final path is left as it was."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._local)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def count_records(path: epath.PathLike) -> int:
    """Number of records in a finished shard (ArrayRecord: from its footer; TFRecord: header scan)."""
    path = epath.Path(path)
    if file_format_of(path) == "tfrecord":
        with path.open("rb") as f:
            return len(tfrecord_index(f)[0])
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def write_split(
    items: Sequence[T],
    to_record: Callable[[T], bytes | None],
    *,
    ds_dir: epath.PathLike,
    split: str,
    num_shards: int,
    file_format: FileFormat = "array_record",
    shards: Iterable[int] | None = None,
    overwrite: bool = False,
) -> dict[int, ShardInfo]:
    """Writes shards `shards` (default all) of a split, shard s holding to_record(items[s::num_shards]).

    `to_record` returns the serialized record, or None to drop an item (e.g. rejected by a quality
    check); the item keeps its shard slot either way, so assignment never depends on what was dropped.
    Finished shards are kept and only counted unless `overwrite`: rerunning after a crash resumes.
    Different processes or hosts can each write a disjoint set of `shards`.
    """
    paths = shard_paths(ds_dir, split, num_shards, file_format)
    done: dict[int, ShardInfo] = {}
    for s in range(num_shards) if shards is None else shards:
        path = paths[s]
        if path.exists() and not overwrite:
            done[s] = ShardInfo(path, count_records(path), path.stat().length)
            continue
        with ShardWriter(path, file_format) as writer:
            for item in shard_items(items, s, num_shards):
                record = to_record(item)
                if record is not None:
                    writer.write(record)
        done[s] = writer.info
    return done


# --- dataset metadata ------------------------------------------------------------------------------


def finished_splits(ds_dir: epath.Path) -> dict[str, tuple[FileFormat, int]]:
    """{split: (format, num_shards)} from the finished shard names; refuses splits with missing shards."""
    template = _template(ds_dir)
    found: dict[str, dict[tuple[str, int], set[int]]] = {}
    for f in ds_dir.iterdir():
        info = template.parse_filename_info(f.name)
        if info is None or info.dataset_name != ds_dir.parent.name or info.filetype_suffix not in FILE_FORMATS:
            continue
        found.setdefault(info.split, {}).setdefault((info.filetype_suffix, info.num_shards), set()).add(
            info.shard_index
        )
    splits = {}
    for split, by_layout in found.items():
        if len(by_layout) != 1:
            raise ValueError(f"split {split!r} has shards of several formats or shard counts: {sorted(by_layout)}")
        ((fmt, n), indices) = next(iter(by_layout.items()))
        if missing := sorted(set(range(n)) - indices):
            raise ValueError(f"split {split!r} is unfinished: shards {missing} of {n} are missing")
        splits[split] = (fmt, n)
    if not splits:
        raise ValueError(f"no finished shards in {ds_dir}")
    if len({fmt for fmt, _ in splits.values()}) != 1:
        raise ValueError(f"splits in {ds_dir} mix file formats: {splits}")
    return splits


def write_dataset_info(
    ds_dir: epath.PathLike,
    *,
    features: tfds.features.FeaturesDict,
    label_names: Sequence[str] = (),
    shard_lengths: Mapping[str, Sequence[int]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **info_kwargs: Any,
) -> None:
    """Writes dataset_info.json, features.json and metadata.json next to the finished shards.

    Run once after every shard of every split exists. `shard_lengths` ({split: [records per shard]}, as
    returned by `write_split`) saves re-counting. `label_names` (the order of `labels`) and `metadata` go to
    metadata.json, read back as `builder.info.metadata`; `info_kwargs` (description, homepage, citation...)
    go to tfds.core.DatasetInfo.
    """
    ds_dir = epath.Path(ds_dir)
    splits = finished_splits(ds_dir)
    split_infos = []
    for split, (fmt, n) in sorted(splits.items()):
        paths = shard_paths(ds_dir, split, n, fmt)
        lengths = list(shard_lengths[split]) if shard_lengths and split in shard_lengths else None
        if lengths is None:
            lengths = [count_records(p) for p in paths]
        if len(lengths) != n:
            raise ValueError(f"split {split!r}: {len(lengths)} shard lengths for {n} shards")
        num_bytes = sum(p.stat().length for p in paths)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes))
    meta = tfds.core.MetadataDict(**(metadata or {}), label_names=list(label_names))
    tfds.folder_dataset.write_metadata(
        data_dir=ds_dir,
        features=features,
        split_infos=split_infos,
        version=ds_dir.name,
        filename_template=_template(ds_dir),
        check_data=False,  # tfds' check reads through tf.data, i.e. needs TensorFlow.
        metadata=meta,
        **info_kwargs,
    )
    with contextlib.suppress(OSError, ValueError):  # the staging dir, if no killed writer left files in it
        (ds_dir / INCOMPLETE_DIR).rmdir()


def read_label_names(ds_dir: epath.PathLike) -> list[str]:
    """The `labels` order of a dataset, from its metadata.json (no tfds builder needed)."""
    return list(json.loads((epath.Path(ds_dir) / "metadata.json").read_text()).get("label_names", []))


def cleanup_incomplete(ds_dir: epath.PathLike) -> None:
    """Removes staging files left by killed writers (only safe when no writer is running)."""
    staging = epath.Path(ds_dir) / INCOMPLETE_DIR
    if staging.exists():
        if _is_local(staging):
            shutil.rmtree(staging)
        else:
            staging.rmtree()


# --- reading TFRecord shards -----------------------------------------------------------------------


class TFRecordDataSource:
    """Random access over TFRecord files for grain (`__len__`, `__getitem__` -> serialized record).

    The offset index is built once by scanning the record headers. File handles are opened lazily per
    process and dropped on pickling, so the source can be sent to grain worker processes; reads take a
    per-file lock, so grain's reader threads can share it.
    """

    def __init__(self, paths: epath.PathLike | Sequence[epath.PathLike], *, verify_crc: bool = True):
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        self._paths = [epath.Path(p) for p in paths]
        self._verify = verify_crc
        self._offsets: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        for p in self._paths:
            with p.open("rb") as f:
                offsets, lengths = tfrecord_index(f)
            self._offsets.append(offsets)
            self._lengths.append(lengths)
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()
        self._init_handles()

    def _init_handles(self) -> None:
        self._handles: dict[int, IO[bytes]] = {}
        self._locks = [threading.Lock() for _ in self._paths]
        self._open_lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, record_key: int) -> bytes:
        key = int(record_key)
        if not 0 <= key < len(self):
            raise IndexError(f"record {record_key} out of range [0, {len(self)})")
        file_idx = bisect.bisect_right(self._starts, key) - 1
        i = key - self._starts[file_idx]
        with self._locks[file_idx]:
            return read_tfrecord_at(
                self._handle(file_idx), int(self._offsets[file_idx][i]), int(self._lengths[file_idx][i]), self._verify
            )

    def _handle(self, file_idx: int) -> IO[bytes]:
        with self._open_lock:
            if file_idx not in self._handles:
                self._handles[file_idx] = self._paths[file_idx].open("rb")
            return self._handles[file_idx]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_handles", "_locks", "_open_lock"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def __repr__(self) -> str:
        return f"TFRecordDataSource({[os.fspath(p) for p in self._paths]!r}, verify_crc={self._verify})"
