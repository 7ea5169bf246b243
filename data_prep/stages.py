"""One source -> one deduplicated TFDS dataset: the stages every runner shares.

    list      source.items(), sorted by relative path; item i keeps number i for the whole build.
    convert   `prepare_item`, pure and per item: decode, quality gates, resize, serialized record.
    decide    `decide`, one pass in item order: first seen wins among exact and near duplicates
              (seeded with the kept hashes of earlier builds for cross-source deduplication); the
              kept items of each split are cut into contiguous, balanced shards.
    write     shard s of a split holds its kept items in item order.
    finish    dataset_info/features/metadata.json, manifest.json, failures.csv and hashes.csv.

Everything after listing is a function of the item list and `PrepOptions`, never of worker timing,
so the local runner and the Beam pipeline write byte-identical shards, and a build resumed after a
crash writes the shards an uninterrupted one would have.

Counts reconcile: listed = view_filtered + missing + seen, and
seen = written + duplicate + near_duplicate + sum(rejected) + failed; every item not written has a
row in failures.csv (path, reason, message).
"""

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from data_prep import decode, quality, records, writers
from data_prep.sources import Source, SourceItem

DATASET_VERSION = "1.0.0"
DEFAULT_SPLIT = "train"
MANIFEST = "manifest.json"
FAILURES = "failures.csv"
HASHES = "hashes.csv"
DUPLICATE_REASONS = ("duplicate", "near_duplicate")
FAILED = "error"  # an unexpected exception in the transform: a bug or an unforeseen input, counted apart
MISSING = "missing"


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    """Everything that decides a build's output bytes (recorded in the manifest; a resume must match)."""

    size: int = 512
    dtype: str = "uint8"
    file_format: writers.FileFormat = "array_record"
    allowed_modalities: tuple[str, ...] | None = quality.DEFAULT_MODALITIES
    chest_only: bool = True
    min_size: int = quality.MIN_SIZE
    noise_threshold: float = quality.NOISE_CORRELATION
    png_compression: records.PngCompression = "deflate"
    deduplicate: bool = True
    near_duplicate_bits: int = quality.NEAR_DUPLICATE_BITS
    records_per_shard: int = 1024

    def __post_init__(self):
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype must be uint8 or uint16, got {self.dtype!r}")
        if self.file_format not in writers.FILE_FORMATS:
            raise ValueError(f"file_format must be one of {writers.FILE_FORMATS}, got {self.file_format!r}")
        if self.png_compression not in records.PNG_COMPRESSIONS:
            raise ValueError(f"png_compression must be one of {records.PNG_COMPRESSIONS}, got {self.png_compression!r}")
        if self.size < 1 or self.records_per_shard < 1:
            raise ValueError(f"size and records_per_shard must be >= 1, got {self.size}, {self.records_per_shard}")
        if self.allowed_modalities is not None:
            object.__setattr__(self, "allowed_modalities", tuple(m.upper() for m in self.allowed_modalities))

    def gates(self) -> dict[str, Any]:
        return {
            "allowed_modalities": self.allowed_modalities,
            "chest_only": self.chest_only,
            "min_size": self.min_size,
            "noise_threshold": self.noise_threshold,
        }

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["allowed_modalities"] = None if self.allowed_modalities is None else list(self.allowed_modalities)
        return d


def recorded_options(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """Options a manifest or build.json records, as PrepOptions.to_json names them today, so that a build made
    before an option changed is not taken for one made with other options (and rebuilt for nothing).

    compress_level (an int) became png_compression: Z_RLE ignores the zlib level, so levels 1-9 and -1 (zlib's
    default, 6) wrote the very bytes of png_compression=deflate. Level 0 stored Paeth-filtered rows, which
    neither option writes (stored has no filter): it stays an option no build matches.
    """
    options = dict(recorded)
    level = options.get("compress_level")
    if "png_compression" not in options and isinstance(level, int) and level != 0 and -1 <= level <= 9:
        del options["compress_level"]
        options["png_compression"] = "deflate"
    return options


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """What the transform made of item `index`: a serialized record, or a reason it made none."""

    index: int
    relpath: str
    split: str
    record: bytes | None = None
    sha256: str = ""
    phash: str = ""
    reason: str | None = None
    message: str = ""

    def row(self) -> dict[str, Any]:
        """The item's outcome without the record bytes (what `decide` and the manifest need)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "record"}


# --- list ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listing:
    """A source's items in build order, and what listing left out."""

    items: list[SourceItem]
    missing: list[SourceItem]
    view_filtered: int

    @property
    def listed(self) -> int:
        return len(self.items) + len(self.missing) + self.view_filtered


def list_items(source: Source) -> Listing:
    """The source's present items sorted by relative path (a stable order on any machine and CSV order)."""
    items = sorted(source.items(), key=lambda item: item.relpath)
    return Listing(items, sorted(source.missing, key=lambda item: item.relpath), source.view_filtered)


def split_name(split: str) -> str:
    """The TFDS split an item goes to: its official split, `train` when the release has none."""
    split = re.sub(r"[^A-Za-z0-9_]", "_", split.strip())
    return split or DEFAULT_SPLIT


def listing_digest(items: Sequence[SourceItem]) -> str:
    """A short fingerprint of the item list, so a resume can tell that the input changed."""
    return quality.pixel_sha256(np.frombuffer("\n".join(i.relpath for i in items).encode(), np.uint8))[:16]


# --- convert ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_file(path: epath.Path) -> Iterator[str]:
    """A local path for `path`: itself, or a temporary copy of a remote object (decoders read local files)."""
    if "://" not in os.fspath(path):
        yield os.fspath(path)
        return
    fd, local = tempfile.mkstemp(suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(path.read_bytes())
        yield local
    finally:
        os.remove(local)


def record_example(item: SourceItem, image: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a converted item: ids from the release's metadata first, the file header second."""
    rows, cols = meta["original_size"]
    return {
        "image": image,
        "source": item.source,
        "path": item.relpath,
        "patient_id": item.patient_id or meta.get("patient_id") or "",
        "study_id": item.study_id or meta.get("study_id") or "",
        "image_id": item.image_id or meta.get("image_id") or "",
        "view_position": item.view_position or meta.get("view_position") or "",
        "photometric": meta.get("photometric") or "",
        "sha256": meta["pixel_sha256"],
        "split": item.split,
        "bits_stored": int(meta.get("bits_stored") or 0),
        "original_height": int(rows),
        "original_width": int(cols),
        "pixel_spacing": list(meta.get("pixel_spacing") or ()),
        "labels": list(item.labels),
    }


def prepare_item(index: int, item: SourceItem, options: PrepOptions) -> ItemResult:
    """The per-item transform of every runner: never raises for anything a file contains."""
    base = {"index": index, "relpath": item.relpath, "split": split_name(item.split)}
    local = os.fspath(item.path)
    try:
        with _local_file(item.path) as local:
            image, meta = decode.convert_file(
                local, size=options.size, dtype=options.dtype, source=item.source, **options.gates()
            )
        record = records.encode_record(record_example(item, image, meta), png_compression=options.png_compression)
    except decode.Rejected as e:  # messages name the file as the release does, not a machine's path
        detail = e.message.removeprefix(f"{local}: ")
        return ItemResult(**base, reason=e.reason, message=f"{item.relpath}: {detail}")
    except Exception as e:  # a decoder bug or an unforeseen input must not stop the build
        return ItemResult(**base, reason=FAILED, message=f"{item.relpath}: unexpected {type(e).__name__}: {e}")
    return ItemResult(**base, record=record, sha256=meta["pixel_sha256"], phash=meta["phash"])


# --- decide ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The outcome of every converted item and where each kept one goes.

    `rows`: item rows in item order, duplicates marked with their reason; `shards`: {split: [[item index,
    ...] per shard]}; `kept_hashes`: (id, sha256, phash) of kept items, for later builds to deduplicate against.
    """

    rows: list[dict[str, Any]]
    shards: dict[str, list[list[int]]]
    kept_hashes: list[tuple[str, str, str]]


def shard_bounds(n: int, num_shards: int) -> list[int]:
    """Cut points of n items into `num_shards` contiguous shards whose sizes differ by at most one."""
    return [(s * n) // num_shards for s in range(num_shards + 1)]


def num_shards_for(n: int, records_per_shard: int) -> int:
    return max(1, math.ceil(n / records_per_shard))


def load_hashes(paths: Iterable[epath.PathLike]) -> list[tuple[str, str, str]]:
    """(id, sha256, phash) rows of earlier builds' hashes.csv (a dataset dir or the file itself)."""
    out = []
    for p in paths:
        p = epath.Path(p)
        p = p / HASHES if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"no {HASHES} at {p}: deduplicate against a finished data_prep build")
        for row in csv.DictReader(io.StringIO(p.read_text())):
            out.append((row["id"], row["sha256"], row["phash"]))
    return out


def decide(
    rows: Sequence[Mapping[str, Any]],
    source: str,
    options: PrepOptions,
    seen_before: Sequence[tuple[str, str, str]] = (),
) -> Plan:
    """Deduplicates converted items in item order and assigns the kept ones to shards (a pure function)."""
    rows = sorted((dict(r) for r in rows), key=lambda r: r["index"])
    if [r["index"] for r in rows] != list(range(len(rows))):
        raise ValueError("decide needs the rows of items 0..n-1, each once")
    dedup = quality.Deduplicator(options.near_duplicate_bits) if options.deduplicate else None
    if dedup is not None:
        for item_id, sha, phash in seen_before:
            dedup.add(item_id, sha, int(phash, 16))
    kept: dict[str, list[int]] = {}
    kept_hashes = []
    for r in rows:
        if r["reason"] is not None:
            continue
        item_id = f"{source}:{r['relpath']}"
        match = dedup.find(r["sha256"], int(r["phash"], 16)) if dedup is not None else None
        if match is not None:
            r["reason"] = "duplicate" if match.exact else "near_duplicate"
            r["message"] = f"{r['relpath']}: {r['reason']} of {match.kept_id} (Hamming {match.distance})"
            continue
        if dedup is not None:
            dedup.add(item_id, r["sha256"], int(r["phash"], 16))
        kept.setdefault(r["split"], []).append(r["index"])
        kept_hashes.append((item_id, r["sha256"], r["phash"]))
    shards = {}
    for split, indices in sorted(kept.items()):
        bounds = shard_bounds(len(indices), num_shards_for(len(indices), options.records_per_shard))
        shards[split] = [indices[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    return Plan(rows, shards, kept_hashes)


# --- finish ----------------------------------------------------------------------------------------


def manifest(name: str, listing: Listing, plan: Plan, options: PrepOptions, **context: Any) -> dict[str, Any]:
    """Counts of a build (see the module docstring for the identities they satisfy)."""
    reasons = Counter(r["reason"] for r in plan.rows if r["reason"] is not None)
    written = sum(len(s) for shards in plan.shards.values() for s in shards)
    counts = {
        "listed": listing.listed,
        "view_filtered": listing.view_filtered,
        "missing": len(listing.missing),
        "seen": len(plan.rows),
        "written": written,
        "duplicate": reasons.pop("duplicate", 0),
        "near_duplicate": reasons.pop("near_duplicate", 0),
        "failed": reasons.pop(FAILED, 0),
        "rejected": dict(sorted(reasons.items())),
    }
    splits = {
        split: {"written": sum(len(s) for s in shards), "num_shards": len(shards)}
        for split, shards in plan.shards.items()
    }
    problems = reconcile(counts)
    if problems:  # cannot happen unless this module is wrong; never write a manifest that lies
        raise AssertionError(f"counts do not reconcile: {problems}")
    return {"name": name, **context, "options": options.to_json(), "counts": counts, "splits": splits}


def reconcile(counts: Mapping[str, Any]) -> list[str]:
    """The count identities a manifest must satisfy; returns what is violated (empty when consistent)."""
    problems = []
    accounted = counts["view_filtered"] + counts["missing"] + counts["seen"]
    if counts["listed"] != accounted:
        problems.append(f"listed {counts['listed']} != view_filtered + missing + seen = {accounted}")
    out = (
        counts["written"] + counts["duplicate"] + counts["near_duplicate"] + counts["failed"]
        + sum(counts["rejected"].values())
    )  # fmt: skip
    if counts["seen"] != out:
        problems.append(f"seen {counts['seen']} != written + duplicate + near_duplicate + rejected + failed = {out}")
    return problems


def failures_csv(listing: Listing, plan: Plan) -> str:
    """path,reason,message for every listed item that was not written (missing files first)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason", "message"])
    for item in listing.missing:
        w.writerow([item.relpath, MISSING, f"{item.relpath}: listed in the metadata but absent under the root"])
    for r in plan.rows:
        if r["reason"] is not None:
            w.writerow([r["relpath"], r["reason"], r["message"]])
    return buf.getvalue()


def hashes_csv(plan: Plan) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "sha256", "phash"])
    w.writerows(plan.kept_hashes)
    return buf.getvalue()


def write_text(path: epath.Path, text: str) -> None:
    """Writes a small file under a temporary name and renames it, so readers never see half of it."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def finish(
    ds_dir: epath.Path,
    source: Source,
    listing: Listing,
    plan: Plan,
    options: PrepOptions,
    **context: Any,
) -> dict[str, Any]:
    """Writes the dataset metadata next to the finished shards; returns the manifest."""
    lengths = {split: [len(s) for s in shards] for split, shards in plan.shards.items()}
    info = manifest(ds_dir.parent.name, listing, plan, options, source=source.name, **context)
    if lengths:
        writers.write_dataset_info(
            ds_dir,
            features=records.record_features(options.dtype),
            label_names=source.label_names,
            shard_lengths=lengths,
            metadata={"source": source.name, "counts": info["counts"]},
            description=f"{source.name} chest radiographs prepared by data_prep ({options.size} px shorter side).",
        )
    write_text(ds_dir / FAILURES, failures_csv(listing, plan))
    write_text(ds_dir / HASHES, hashes_csv(plan))
    write_text(ds_dir / MANIFEST, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def finished_build(ds_dir: epath.Path, options: PrepOptions) -> dict[str, Any] | None:
    """The manifest of a finished build at `ds_dir` (None if there is none); other options are an error."""
    path = ds_dir / MANIFEST
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if recorded_options(info["options"]) != options.to_json():
        raise ValueError(f"{ds_dir} was built with other options {info['options']}; use --overwrite to rebuild")
    return info


def remove_tree(path: epath.Path) -> None:
    if not path.exists():
        return
    if "://" in os.fspath(path):
        path.rmtree()
    else:
        shutil.rmtree(path)
