"""The default runner: a build on one machine, in worker processes, resumable after a crash.

Items are converted in chunks of consecutive items. A chunk's records go to a staging ArrayRecord
file and its outcome rows to a JSONL file, written (atomically) last: a finished chunk is never
converted again. Shards are then assembled from the staged records (no image is decoded twice) and
committed by rename, so a rerun skips them too. The staging directory `.work/` is removed when the
build finishes; `build.json` in it pins the options and item list a resume must match.
"""

import contextlib
import itertools
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import tqdm
from array_record.python import array_record_module
from etils import epath

from data_prep import stages, writers
from data_prep.sources import Source, SourceItem

WORK_DIR = ".work"
BUILD_JSON = "build.json"
DEFAULT_CHUNK_SIZE = 64
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def chunk_paths(work: epath.Path, chunk: int) -> tuple[epath.Path, epath.Path]:
    """(staged records, outcome rows) of a chunk; the rows file is the chunk's completion marker."""
    return work / f"chunk-{chunk:06d}.array_record", work / f"chunk-{chunk:06d}.jsonl"


def convert_chunk(work: epath.Path, chunk: int, start: int, items: Sequence[SourceItem], options) -> int:
    """Converts items start.. of one chunk into its staging files; returns the number of items."""
    records_path, rows_path = chunk_paths(work, chunk)
    rows = []
    with writers.ShardWriter(records_path, "array_record") as writer:
        for k, item in enumerate(items):
            result = stages.prepare_item(start + k, item, options)
            row = result.row()
            if result.record is not None:
                row["position"] = writer.num_records
                writer.write(result.record)
            rows.append(row)
    stages.write_text(rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return len(items)


def _convert_task(args: tuple) -> int:
    return convert_chunk(*args)


def read_rows(work: epath.Path, num_chunks: int) -> list[dict[str, Any]]:
    rows = []
    for chunk in range(num_chunks):
        rows_path = chunk_paths(work, chunk)[1]
        rows.extend((json.loads(line) | {"chunk": chunk}) for line in rows_path.read_text().splitlines())
    return rows


def write_shard(path: epath.Path, file_format: str, locations: Sequence[tuple[epath.Path, int]]) -> int:
    """Writes a shard from staged records (chunk file, position), in the given order; skips a finished one."""
    if path.exists():
        return len(locations)
    with writers.ShardWriter(path, file_format) as writer:
        for chunk_file, group in itertools.groupby(locations, key=lambda loc: loc[0]):
            reader = array_record_module.ArrayRecordReader(os.fspath(chunk_file))
            try:
                for record in reader.read([pos for _, pos in group]):
                    writer.write(record)
            finally:
                reader.close()
    return writer.num_records


def _shard_task(args: tuple) -> int:
    return write_shard(*args)


def _map(fn, tasks: list, workers: int, bar: tqdm.tqdm, weight=lambda result: result):
    """Runs `fn` over `tasks` in `workers` spawned processes (in this one when workers <= 1)."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            bar.update(weight(fn(task)))
        return
    with _single_threaded_children():
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
    with pool:
        for result in pool.imap_unordered(fn, tasks):
            bar.update(weight(result))


@contextlib.contextmanager
def _single_threaded_children():
    """Workers inherit one BLAS/OpenMP thread each: N processes x N threads oversubscribe the cores
    (measured: numpy reductions 70x slower with two workers on two cores)."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: os.environ.get(k) or "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_build(work: epath.Path, expected: dict[str, Any]) -> None:
    """A resume must continue the same build: same source, options, chunking and item list."""
    path = work / BUILD_JSON
    if path.exists():
        found = json.loads(path.read_text())
        if "options" in found:  # an unfinished build of an older version: its options in today's names
            found["options"] = stages.recorded_options(found["options"])
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if diff:
            raise ValueError(
                f"{work.parent} holds an unfinished build with different {diff} "
                f"(was {[found.get(k) for k in diff]}, now {[expected.get(k) for k in diff]}); "
                "rerun with the same settings to resume, or with --overwrite to start again"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
        stages.write_text(path, json.dumps(expected, indent=2, sort_keys=True) + "\n")


def run_local(
    source: Source,
    workdir: epath.PathLike,
    options: stages.PrepOptions,
    *,
    name: str | None = None,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dedup_against: Sequence[epath.PathLike] = (),
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds `<workdir>/<name>/1.0.0` from `source`; returns the manifest. Rerun to resume after a crash."""
    ds_dir = writers.dataset_dir(workdir, name or source.name, stages.DATASET_VERSION)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if overwrite:
        stages.remove_tree(ds_dir)
    if (info := stages.finished_build(ds_dir, options)) is not None:
        return info
    listing = stages.list_items(source)
    items = listing.items
    seen_before = stages.load_hashes(dedup_against)
    work = ds_dir / WORK_DIR
    _check_build(
        work,
        {
            "source": source.name,
            "options": options.to_json(),
            "chunk_size": chunk_size,
            "num_items": len(items),
            "listing": stages.listing_digest(items),
            "dedup_against": [os.fspath(p) for p in dedup_against],
        },
    )
    writers.cleanup_incomplete(work)  # what killed writers left: one build runs at a time per dataset
    num_chunks = -(-len(items) // chunk_size)
    todo = [c for c in range(num_chunks) if not chunk_paths(work, c)[1].exists()]
    finished = len(items) - sum(len(items[c * chunk_size : (c + 1) * chunk_size]) for c in todo)
    tasks = [(work, c, c * chunk_size, items[c * chunk_size : (c + 1) * chunk_size], options) for c in todo]
    bar_args = {"disable": not progress, "file": sys.stderr, "dynamic_ncols": True}
    with tqdm.tqdm(total=len(items), initial=finished, desc=f"convert {source.name}", unit="img", **bar_args) as bar:
        _map(_convert_task, tasks, workers, bar)

    rows = read_rows(work, num_chunks)
    plan = stages.decide(rows, source.name, options, seen_before)
    where = {r["index"]: (chunk_paths(work, r["chunk"])[0], r["position"]) for r in rows if "position" in r}
    shard_tasks = []
    for split, shards in plan.shards.items():
        paths = writers.shard_paths(ds_dir, split, len(shards), options.file_format)
        shard_tasks += [(p, options.file_format, [where[i] for i in s]) for p, s in zip(paths, shards)]
    writers.cleanup_incomplete(ds_dir)
    total = sum(len(t[2]) for t in shard_tasks)
    with tqdm.tqdm(total=total, desc=f"write {source.name}", unit="img", **bar_args) as bar:
        _map(_shard_task, shard_tasks, workers, bar)

    info = stages.finish(ds_dir, source, listing, plan, options, input=os.fspath(source.root), runner="local")
    if not keep_work:
        stages.remove_tree(work)
    return info
