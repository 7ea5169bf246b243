"""The same build on Apache Beam (Dataflow, Flink, Spark, or the DirectRunner), for when one machine is slow.

The driver lists the source and writes the item list to `<dataset>/.work/items.jsonl`; the pipeline
reads it back in parallel, runs `stages.prepare_item` on workers, gathers the small outcome rows
into one `stages.decide` (deduplication is first-seen-wins in item order, a sequential decision),
and writes each shard from its records in item order. The driver then writes the dataset metadata
with `stages.finish`. Shards are byte-identical to the local runner's. Needs the `beam` extra:
`pip install 'chexfound-jax[beam]'`; runner and cloud settings are ordinary Beam pipeline options.
"""

import json
from collections.abc import Sequence
from typing import Any

from etils import epath

from data_prep import stages, writers
from data_prep.sources import Source, SourceItem

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # the local runner needs none of this
    beam = None

ITEMS = "items.jsonl"
PLAN = "plan.json"


def item_to_json(index: int, item: SourceItem) -> str:
    """One item as a JSON line (NaN labels as JSON's NaN extension, which json.loads reads back)."""
    fields = {k: getattr(item, k) for k in SourceItem.__dataclass_fields__}
    fields["path"] = str(item.path)
    return json.dumps({"index": index, **fields}, sort_keys=True)


def item_from_json(line: str) -> tuple[int, SourceItem]:
    d = json.loads(line)
    index = d.pop("index")
    d["path"] = epath.Path(d["path"])
    d["labels"] = tuple(float(x) for x in d["labels"])
    return index, SourceItem(**d)


def _convert(line: str, options: stages.PrepOptions) -> stages.ItemResult:
    index, item = item_from_json(line)
    return stages.prepare_item(index, item, options)


def _assignments(plan: stages.Plan) -> dict[int, tuple[str, int, int]]:
    """item index -> (split, shard, number of shards of the split)."""
    out = {}
    for split, shards in plan.shards.items():
        for s, indices in enumerate(shards):
            out.update(dict.fromkeys(indices, (split, s, len(shards))))
    return out


def _route(result: stages.ItemResult, assignments: dict[int, tuple[str, int, int]]):
    if result.record is not None and result.index in assignments:
        yield assignments[result.index], (result.index, result.record)


def _write_shard(group: tuple[tuple[str, int, int], Any], ds_dir: str, file_format: str) -> int:
    (split, shard, num_shards), records = group
    path = writers.shard_paths(ds_dir, split, num_shards, file_format)[shard]
    with writers.ShardWriter(path, file_format) as writer:
        for _, record in sorted(records, key=lambda r: r[0]):
            writer.write(record)
    return writer.num_records


def _plan_json(plan: stages.Plan) -> str:
    return json.dumps({"rows": plan.rows, "shards": plan.shards, "kept_hashes": plan.kept_hashes})


def _save(text: str, path: str) -> None:
    stages.write_text(epath.Path(path), text)


def build_pipeline(
    root: "beam.Pipeline",
    items_path: str,
    plan_path: str,
    ds_dir: str,
    source_name: str,
    options: stages.PrepOptions,
    seen_before: Sequence[tuple[str, str, str]] = (),
) -> None:
    """Adds the build's transforms to `root`: items.jsonl in, shards and plan.json out."""
    results = (
        root
        | "ReadItems" >> beam.io.ReadFromText(items_path)
        | "Reshuffle" >> beam.Reshuffle()
        | "Convert" >> beam.Map(_convert, options)
    )
    plan = (
        results
        | "Rows" >> beam.Map(lambda r: r.row())
        | "AllRows" >> beam.combiners.ToList()
        | "Decide" >> beam.Map(stages.decide, source_name, options, list(seen_before))
    )
    plan | "SavePlan" >> beam.Map(lambda p: _save(_plan_json(p), plan_path))
    assignments = plan | "Assign" >> beam.Map(_assignments)
    (
        results
        | "Route" >> beam.FlatMap(_route, beam.pvalue.AsSingleton(assignments))
        | "GroupShards" >> beam.GroupByKey()
        | "WriteShards" >> beam.Map(_write_shard, ds_dir, options.file_format)
    )


def run_beam(
    source: Source,
    workdir: epath.PathLike,
    options: stages.PrepOptions,
    *,
    name: str | None = None,
    dedup_against: Sequence[epath.PathLike] = (),
    beam_args: Sequence[str] = (),
    overwrite: bool = False,
    keep_work: bool = False,
) -> dict[str, Any]:
    """Builds `<workdir>/<name>/1.0.0` on Beam; `beam_args` are Beam's own flags (--runner=..., --project=...)."""
    if beam is None:
        raise ImportError("the beam runner needs Apache Beam: pip install 'chexfound-jax[beam]'")
    ds_dir = writers.dataset_dir(workdir, name or source.name, stages.DATASET_VERSION)
    if overwrite:
        stages.remove_tree(ds_dir)
    if (info := stages.finished_build(ds_dir, options)) is not None:
        return info
    listing = stages.list_items(source)
    seen_before = stages.load_hashes(dedup_against)
    work = ds_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    items_path, plan_path = work / ITEMS, work / PLAN
    stages.write_text(items_path, "".join(item_to_json(i, item) + "\n" for i, item in enumerate(listing.items)))
    if listing.items:
        with beam.Pipeline(options=PipelineOptions(list(beam_args))) as root:
            build_pipeline(root, str(items_path), str(plan_path), str(ds_dir), source.name, options, seen_before)
        saved = json.loads(plan_path.read_text())
        plan = stages.Plan(saved["rows"], saved["shards"], [tuple(h) for h in saved["kept_hashes"]])
    else:
        plan = stages.Plan([], {}, [])
    info = stages.finish(ds_dir, source, listing, plan, options, input=str(source.root), runner="beam")
    if not keep_work:
        stages.remove_tree(work)
    return info
