"""Evaluation tasks over data_prep's labelled shards: which label columns, how -1 / NaN are read, which split.

A task (`TaskSpec`) names the head's classes, the shard label columns they come from, the uncertain (-1)
and unknown (NaN) policies, and where each evaluation split's records come from: a data_prep split read
whole, or one part of a seeded patient-level partition of it (the releases without an official validation
split). `load_task` turns shards + task into one `LabelTable` per split: record positions into
`ShardedSource(datasets, shard_split)` with their labels in {1, 0, NaN}, NaN being masked out of losses
and metrics.

Labels are read from the records' metadata only (`read_metadata`: the tf.train.Example is parsed, the PNG
never decoded): the shard read plus about a tenth of a millisecond per record, tens of times faster than
decoding the records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from chexfound_jax.data.classes import CHEXPERT_COMPETITION, TASK_CLASSES
from chexfound_jax.data.pipeline import shard_files
from data_prep import writers

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
MISSING_POLICIES = ("ignore", "zeros")
ABSENT_COLUMN_POLICIES = ("error", "unknown")
# Text fields read_metadata returns, one str per record.
METADATA_TEXT = ("source", "path", "patient_id", "study_id", "image_id", "view_position", "split")


# --- task specs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Where one evaluation split's records come from.

    `holdout`: fractions of a seeded patient-level partition of `shard_split` (summing to 1), balanced by
    image count; `part` picks this split's part. Without a holdout the whole shard split is used.
    """

    shard_split: str
    holdout: tuple[float, ...] | None = None
    part: int = 0

    def __post_init__(self):
        if not isinstance(self.shard_split, str) or not self.shard_split:
            raise ValueError(f"shard_split must be a non-empty str, got {self.shard_split!r}")
        if self.holdout is None:
            if self.part != 0:
                raise ValueError(f"part={self.part} needs a holdout partition (shard split {self.shard_split!r})")
            return
        holdout = tuple(float(f) for f in self.holdout)
        if len(holdout) < 2 or min(holdout) <= 0 or not math.isclose(sum(holdout), 1.0, abs_tol=1e-6):
            raise ValueError(f"holdout must be >= 2 positive fractions summing to 1, got {self.holdout}")
        if not 0 <= self.part < len(holdout):
            raise ValueError(f"part={self.part} is not a part of holdout {holdout}")
        object.__setattr__(self, "holdout", holdout)


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def _as_split_rule(value: Any, where: str) -> SplitRule:
    if isinstance(value, SplitRule):
        return value
    value = _plain(value)
    if isinstance(value, str):
        return SplitRule(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a SplitRule, a shard split name or a mapping, got {value!r}")
    fields = {f.name for f in dataclasses.fields(SplitRule)}
    if unknown := sorted(set(value) - fields):
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    try:
        return SplitRule(**value)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def _default_splits() -> dict[str, SplitRule]:
    return {s: SplitRule(s) for s in ("train", "val", "test")}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One downstream task: the head's classes and how its labels and splits are read from shards.

    `uncertain` (-1): "ignore" (unknown, masked), "zeros" (U-Zeros), "ones" (U-Ones). `missing` (NaN, a
    blank cell): "ignore" (masked) or "zeros" (CheXpert's official NaN -> 0). `absent_columns`: what a
    label column absent from one of several datasets means: "error", or "unknown" (NaN for that dataset's
    records whatever `missing` says, e.g. CXR-LT classes on CheXpert images). `views`: keep only records
    whose view_position is one of these (case-insensitive); None keeps all. Records whose labels are all
    unknown after the policies are dropped (they would carry no loss and no metric). `multiview`: each
    record also gets a second view from its study (`second_views`), for the two-view linear probe.
    """

    name: str
    class_names: tuple[str, ...]
    label_columns: tuple[str, ...] | None = None
    uncertain: str = "ignore"
    missing: str = "ignore"
    splits: Mapping[str, SplitRule] = dataclasses.field(default_factory=_default_splits)
    split_seed: int = 0
    views: tuple[str, ...] | None = None
    absent_columns: str = "error"
    multiview: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("class_names", tuple(self.class_names))
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"task {self.name!r}: class_names must be non-empty and unique, got {self.class_names}")
        if self.label_columns is not None:
            set_("label_columns", tuple(self.label_columns))
            if len(self.label_columns) != len(self.class_names):
                raise ValueError(
                    f"task {self.name!r}: {len(self.label_columns)} label_columns for {len(self.class_names)} classes"
                )
        for field, value, allowed in (
            ("uncertain", self.uncertain, UNCERTAIN_POLICIES),
            ("missing", self.missing, MISSING_POLICIES),
            ("absent_columns", self.absent_columns, ABSENT_COLUMN_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"task {self.name!r}: {field} must be one of {allowed}, got {value!r}")
        if self.views is not None:
            set_("views", tuple(v.upper() for v in self.views))
        splits = {k: _as_split_rule(v, f"task {self.name!r} split {k!r}") for k, v in dict(self.splits).items()}
        if not splits:
            raise ValueError(f"task {self.name!r} has no splits")
        set_("splits", splits)
        _check_disjoint(self.name, splits)

    def binary(self) -> bool:
        """One output (the official code collapses 2-class datasets to K = 1)."""
        return len(self.class_names) == 1

    def columns(self) -> tuple[str, ...]:
        """The shard label name each class is read from."""
        return self.label_columns if self.label_columns is not None else self.class_names


def _check_disjoint(name: str, splits: Mapping[str, SplitRule]) -> None:
    """Splits reading one shard split must be different parts of one partition, or they would overlap."""
    by_shard: dict[str, list[tuple[str, SplitRule]]] = {}
    for split, rule in splits.items():
        by_shard.setdefault(rule.shard_split, []).append((split, rule))
    for shard_split, rules in by_shard.items():
        if len(rules) < 2:
            continue
        names = [s for s, _ in rules]
        if len({r.holdout for _, r in rules}) != 1 or rules[0][1].holdout is None:
            raise ValueError(
                f"task {name!r}: splits {names} read shard split {shard_split!r} without one shared holdout"
            )
        if len({r.part for _, r in rules}) != len(rules):
            raise ValueError(f"task {name!r}: splits {names} take the same part of shard split {shard_split!r}")


def _fractions(*counts: int) -> tuple[float, ...]:
    """Holdout fractions reproducing the official split sizes."""
    total = sum(counts)
    return tuple(c / total for c in counts)


def _holdout_splits(shard_split: str, counts: Sequence[int], names: Sequence[str]) -> dict[str, SplitRule]:
    fr = _fractions(*counts)
    return {n: SplitRule(shard_split, fr, i) for i, n in enumerate(names)}


_CHEXPERT = TaskSpec(
    "chexpert",
    CHEXPERT_COMPETITION,
    uncertain="zeros",
    missing="zeros",
    splits={"train": SplitRule("train"), "val": SplitRule("valid"), "test": SplitRule("test")},
    views=("AP", "PA"),
)

# Shard splits are the names data_prep writes. How each release maps onto them (official sizes, data/datasets/):
# - cxr_lt: data_prep's cxr_lt source. Its "train" split (train_labeled.csv, 258,871 MIMIC-CXR images, every
#   view) is re-split by patient like the official 207,096 / 51,775; test is its "development" split (the
#   39,293 labelled development images). Its "test" split (the official CXRLTTest1) is a config override away.
# - nih: the official lists become shard splits "train_val" (86,524) and "test" (25,596); val is a patient
#   holdout of train_val sized like the official last 10,002 images (the official cut is by file order).
#   nih_no_finding: the official binarizer's 15 columns (the 14 findings and No Finding, sorted).
# - chexpert: CheXpert-v1.0 "train" (frontal: 191,027) and "valid" (202) as val; test: the 518 frontal
#   images of the CheXpert test set (radiologist labels, released apart from v1.0) as shard split "test".
#   U-Zeros and NaN -> 0 as the official code; chexpert_uones is the U-Ones variant.
# - shenzhen / montgomery / jsrt: one shard split "train" (no official split), partitioned by patient with
#   the official proportions (463/65/134, 96/14/28, 171/24/50). A record without patient id is its own patient.
_NIH_SPLITS = {**_holdout_splits("train_val", (76_522, 10_002), ("train", "val")), "test": SplitRule("test")}

TASKS: dict[str, TaskSpec] = {
    "cxr_lt": TaskSpec(
        "cxr_lt",
        TASK_CLASSES["cxr_lt"],
        splits={**_holdout_splits("train", (207_096, 51_775), ("train", "val")), "test": SplitRule("development")},
    ),
    "nih": TaskSpec("nih", TASK_CLASSES["nih"], splits=_NIH_SPLITS),
    "nih_no_finding": TaskSpec("nih_no_finding", TASK_CLASSES["nih_no_finding"], splits=_NIH_SPLITS),
    "chexpert": _CHEXPERT,
    "chexpert_uones": dataclasses.replace(_CHEXPERT, name="chexpert_uones", uncertain="ones"),
    "shenzhen": TaskSpec(
        "shenzhen", TASK_CLASSES["shenzhen"], splits=_holdout_splits("train", (463, 65, 134), ("train", "val", "test"))
    ),
    "montgomery": TaskSpec(
        "montgomery",
        TASK_CLASSES["montgomery"],
        splits=_holdout_splits("train", (96, 14, 28), ("train", "val", "test")),
    ),
    "jsrt": TaskSpec(
        "jsrt", TASK_CLASSES["jsrt"], splits=_holdout_splits("train", (171, 24, 50), ("train", "val", "test"))
    ),
}


def task_from_config(cfg: Any) -> TaskSpec:
    """A TaskSpec from a ConfigDict or dict: `name` of a TASKS entry plus overrides, or every field.

    `splits` (when given) replaces the whole mapping; each rule is a SplitRule, a shard split name, or a
    mapping with shard_split / holdout / part.
    """
    cfg = dict(_plain(cfg))
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    if unknown := sorted(set(cfg) - fields):
        raise ValueError(f"task config: unknown keys {unknown}; known: {sorted(fields)}")
    if "name" not in cfg:
        raise ValueError(f"task config needs a `name` (one of {sorted(TASKS)} or a new task's name)")
    for key in ("class_names", "label_columns", "views"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    if "splits" in cfg:
        cfg["splits"] = {
            k: _as_split_rule(v, f"task config split {k!r}") for k, v in dict(_plain(cfg["splits"])).items()
        }
    base = TASKS.get(cfg["name"])
    if base is not None:
        return dataclasses.replace(base, **cfg)
    if "class_names" not in cfg:
        raise ValueError(f"task {cfg['name']!r} is not one of {sorted(TASKS)}, so it needs class_names (and splits)")
    return TaskSpec(**cfg)


# --- label policies and partitions -----------------------------------------------------------------


def apply_policies(labels: np.ndarray, uncertain: str = "ignore", missing: str = "ignore") -> np.ndarray:
    """Shard labels (1, 0, -1 uncertain, NaN unknown) -> float32 labels in {1, 0, NaN}.

    The policies act on the original values, so U-Ignore with NaN -> 0 keeps the uncertain entries unknown.
    """
    if uncertain not in UNCERTAIN_POLICIES or missing not in MISSING_POLICIES:
        raise ValueError(f"policies must be uncertain in {UNCERTAIN_POLICIES}, missing in {MISSING_POLICIES}")
    x = np.asarray(labels, np.float32)
    nan, unc = np.isnan(x), x == -1
    if bad := sorted(set(np.unique(x[~nan & ~unc]).tolist()) - {0.0, 1.0}):
        raise ValueError(f"labels must be 1, 0, -1 or NaN; found {bad[:10]}")
    out = x.copy()
    out[unc] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    if missing == "zeros":
        out[nan] = 0.0
    return out


def holdout_parts(patient_id: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """(N,) part of each record: patients in a seeded random order, cut where the image counts reach the fractions.

    A patient goes to the part holding the midpoint of its images in the cumulative count, so every part is
    within half a patient's images of its share, and a patient is never in two parts. The patient order
    depends only on the set of ids and the seed (ids are sorted before the permutation).
    """
    patients, inverse, counts = np.unique(np.asarray(patient_id), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    sizes = counts[order]
    mid = np.cumsum(sizes) - sizes / 2
    bounds = np.cumsum(np.asarray(fractions, np.float64))[:-1] * len(inverse)
    part = np.empty(len(patients), np.int64)
    part[order] = np.searchsorted(bounds, mid, side="right")
    return part[inverse.reshape(-1)]


# --- metadata --------------------------------------------------------------------------------------


def _iter_shard(path: epath.Path) -> Iterator[bytes]:
    """The serialized records of one shard in order, streamed (a shard can be larger than memory wants)."""
    if writers.file_format_of(path) == "tfrecord":
        with path.open("rb") as f:
            offsets, lengths = writers.tfrecord_index(f)
            for offset, length in zip(offsets, lengths):
                yield writers.read_tfrecord_at(f, int(offset), int(length))
        return
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        for _ in range(reader.num_records()):
            yield reader.read()
    finally:
        reader.close()


def _parse_shard(path: epath.Path, num_labels: int) -> tuple[dict[str, list[str]], np.ndarray]:
    """Text fields and (n, num_labels) labels of every record of one shard; the PNGs are not decoded."""
    text: dict[str, list[str]] = {k: [] for k in METADATA_TEXT}
    labels = []
    for i, data in enumerate(_iter_shard(path)):
        try:
            feature = tf_example_pb2.Example.FromString(data).features.feature
            for k in METADATA_TEXT:
                text[k].append(feature[k].bytes_list.value[0].decode("utf-8"))
            values = feature["labels"].float_list.value
        except Exception as e:  # a missing feature reads as an empty list
            raise ValueError(f"{path} record {i}: not a data_prep record ({type(e).__name__}: {e})") from e
        if len(values) != num_labels:
            raise ValueError(f"{path} record {i}: {len(values)} labels, but metadata.json names {num_labels}")
        labels.append(list(values))  # a copy: the repeated field would keep the whole record alive
    return text, np.array(labels, np.float32).reshape(-1, num_labels)


def read_metadata(datasets: Sequence[epath.PathLike], shard_split: str, *, threads: int = 4) -> dict[str, np.ndarray]:
    """Per record of `ShardedSource(datasets, shard_split)`, in its order: labels and ids, without decoding images.

    Returns (N,) arrays `record_index` (int64, = position), `dataset` (int32 index into `datasets`), the
    str fields of METADATA_TEXT, `labels` (N, L) float32 and `label_names` (L,). Datasets may have different
    label_names: the columns are the union of their names (first dataset's order, then each new name), a
    column absent from a dataset is NaN for its records. An empty patient_id is replaced by the record's
    image_id: an image without patient is its own patient.
    """
    if not datasets:
        raise ValueError("no datasets given")
    names: list[str] = []
    jobs = []
    for d, ds in enumerate(datasets):
        ds_names = writers.read_label_names(ds)
        if len(set(ds_names)) != len(ds_names):
            raise ValueError(f"{ds}/metadata.json: label_names has duplicates: {ds_names}")
        names += [n for n in ds_names if n not in names]
        cols = [names.index(n) for n in ds_names]
        jobs += [(d, cols, f) for f in shard_files(ds, shard_split)]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
        parsed = list(pool.map(lambda job: _parse_shard(job[2], len(job[1])), jobs))
    labels = np.full((sum(len(p[1]) for p in parsed), len(names)), np.nan, np.float32)
    start = 0
    for (_, cols, _), (_, lab) in zip(jobs, parsed):
        labels[start : start + len(lab), cols] = lab
        start += len(lab)
    out = {k: np.array([v for text, _ in parsed for v in text[k]], dtype=str) for k in METADATA_TEXT}
    out["patient_id"] = np.where(out["patient_id"] == "", out["image_id"], out["patient_id"])
    out["record_index"] = np.arange(len(labels), dtype=np.int64)
    out["dataset"] = np.concatenate([np.full(len(p[1]), d, np.int32) for (d, _, _), p in zip(jobs, parsed)])
    out["labels"] = labels
    out["label_names"] = np.array(names, dtype=str)
    return out


# --- label tables ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LabelTable:
    """One evaluation split: records of `ShardedSource(datasets, shard_split)` and their labels after the policies."""

    task: str
    split: str
    shard_split: str
    record_index: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N, K) float32 in {1, 0, NaN}
    patient_id: np.ndarray  # (N,) str
    image_id: np.ndarray  # (N,) str
    path: np.ndarray  # (N,) str
    class_names: tuple[str, ...] = ()
    second_record: np.ndarray | None = None  # (N,) int64: the second view's record (multiview tasks)

    def __len__(self) -> int:
        return len(self.record_index)

    def subset(self, positions: np.ndarray) -> LabelTable:
        """The rows at `positions` (indices into this table), in that order."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions outside [0, {len(self)}) of {self.task}/{self.split}")
        take = lambda a: a[pos]
        return dataclasses.replace(
            self,
            record_index=take(self.record_index),
            labels=take(self.labels),
            patient_id=take(self.patient_id),
            image_id=take(self.image_id),
            path=take(self.path),
            second_record=None if self.second_record is None else take(self.second_record),
        )


def _task_labels(datasets: Sequence[epath.PathLike], task: TaskSpec, meta: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, K) labels of the task's columns after the policies; columns absent from a dataset per `absent_columns`."""
    union = list(meta["label_names"])
    labels = np.full((len(meta["record_index"]), len(task.class_names)), np.nan, np.float32)
    for d, ds in enumerate(datasets):
        ds_names = writers.read_label_names(ds)
        rows = meta["dataset"] == d
        for k, col in enumerate(task.columns()):
            if col not in ds_names:
                if task.absent_columns == "error":
                    raise ValueError(
                        f"task {task.name!r}: label column {col!r} (class {task.class_names[k]!r}) is not in "
                        f"{ds}: its label_names are {ds_names}"
                    )
                continue  # unknown for this dataset, whatever the missing policy
            try:
                labels[rows, k] = apply_policies(meta["labels"][rows, union.index(col)], task.uncertain, task.missing)
            except ValueError as e:
                raise ValueError(f"{ds} label column {col!r}: {e}") from e
    return labels


def second_views(meta: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) record index of each record's second view: another image of the same study, in record order.

    A study is (dataset, source, patient_id, study_id). The partner is the first other record of the study
    whose view_position differs (a lateral for a frontal, a frontal for a lateral), else the first other
    record; a record without a study id, or alone in its study, is its own second view.
    """
    out = meta["record_index"].astype(np.int64).copy()
    view = np.char.upper(np.char.strip(meta["view_position"]))
    studies: dict[tuple, list[int]] = {}
    keys = zip(meta["dataset"].tolist(), meta["source"], meta["patient_id"], meta["study_id"])
    for i, (d, source, patient, study) in enumerate(keys):
        if study:
            studies.setdefault((d, source, patient, study), []).append(i)
    for members in studies.values():
        for i in members if len(members) > 1 else ():
            others = [j for j in members if j != i]
            out[i] = next((j for j in others if view[j] != view[i]), others[0])
    return out


def load_task(
    datasets: Sequence[epath.PathLike], task: TaskSpec, splits: Sequence[str] = ("train", "val", "test")
) -> dict[str, LabelTable]:
    """One LabelTable per requested split of `task` over the data_prep `datasets` (in ShardedSource order).

    Holdout partitions are computed over every record of the shard split (before the view filter and the
    dropping of all-unknown rows), so a split's membership does not depend on the label policies.
    """
    if missing := [s for s in splits if s not in task.splits]:
        raise ValueError(f"task {task.name!r} has no split(s) {missing}; it has {sorted(task.splits)}")
    datasets = list(datasets)
    tables: dict[str, LabelTable] = {}
    for shard_split in dict.fromkeys(task.splits[s].shard_split for s in splits):
        meta = read_metadata(datasets, shard_split)
        labels = _task_labels(datasets, task, meta)
        keep = ~np.all(np.isnan(labels), axis=1)
        second = second_views(meta) if task.multiview else None  # partners may be filtered-out records
        if task.views is not None:
            keep &= np.isin(np.char.upper(meta["view_position"]), task.views)
        parts: dict[tuple[float, ...], np.ndarray] = {}
        for split in splits:
            rule = task.splits[split]
            if rule.shard_split != shard_split:
                continue
            rows = keep
            if rule.holdout is not None:
                if rule.holdout not in parts:
                    parts[rule.holdout] = holdout_parts(meta["patient_id"], rule.holdout, task.split_seed)
                rows = keep & (parts[rule.holdout] == rule.part)
            idx = np.flatnonzero(rows)
            tables[split] = LabelTable(
                task=task.name,
                split=split,
                shard_split=shard_split,
                record_index=meta["record_index"][idx],
                labels=labels[idx],
                patient_id=meta["patient_id"][idx],
                image_id=meta["image_id"][idx],
                path=meta["path"][idx],
                class_names=task.class_names,
                second_record=None if second is None else second[idx],
            )
    _warn_shared_patients(tables)
    return {s: tables[s] for s in splits}


def _warn_shared_patients(tables: Mapping[str, LabelTable]) -> None:
    """Splits from different shard splits are the release's; say so if its splits share patients."""
    names = sorted(tables)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = np.intersect1d(tables[a].patient_id, tables[b].patient_id)
            if shared.size:
                logging.warning(
                    "task %s: splits %s and %s share %d patients (e.g. %s): the release's own splits overlap",
                    tables[a].task, a, b, shared.size, shared[:3].tolist(),
                )  # fmt: skip
