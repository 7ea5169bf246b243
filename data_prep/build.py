r"""Build one source's training shards: chest X-ray archive in, deduplicated TFDS dataset out.

  python -m data_prep.build --source=nih_cxr14 --input=/data/nih --workdir=/data/cxr1m \
      [--metadata=DIR] [--size=512] [--format=array_record|tfrecord] [--runner=local|beam] [--workers=N]

writes `<workdir>/<source>/1.0.0/` (shards, dataset_info.json, metadata.json with the label order,
manifest.json with the counts, failures.csv, hashes.csv). Build the sources of CXR-1M one after the
other, each with `--dedup_against` naming the datasets built before it, to drop images that several
archives share. A killed local build resumes when rerun with the same flags. On Beam, runner settings
go in --beam_args, e.g. --beam_args="--runner=DataflowRunner --project=P --region=R --temp_location=gs://..."
(local and gs:// paths both work).
"""

import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from data_prep import quality, records, retired_flags, stages
from data_prep.sources import SOURCES, get_source


def parse_source_options(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> adapter keyword arguments (JSON values, else the raw string)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--source_option must be KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def parse_views(views: str) -> str | list[str]:
    return views if views in ("frontal", "all") else [v.strip() for v in views.split(",") if v.strip()]


def parse_modalities(modalities: str) -> tuple[str, ...] | None:
    if modalities.strip().lower() == "all":
        return None
    return tuple(m.strip().upper() for m in modalities.split(",") if m.strip())


def summary(info: dict[str, Any]) -> str:
    c = info["counts"]
    rejected = ", ".join(f"{k} {v}" for k, v in c["rejected"].items()) or "none"
    splits = ", ".join(f"{s} {v['written']} in {v['num_shards']} shards" for s, v in info["splits"].items())
    return (
        f"{info['name']}: listed {c['listed']} (view-filtered {c['view_filtered']}, missing {c['missing']}), "
        f"seen {c['seen']}: written {c['written']}, duplicate {c['duplicate']}, "
        f"near-duplicate {c['near_duplicate']}, failed {c['failed']}, rejected: {rejected}\n"
        f"  splits: {splits or 'none'}"
    )


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    flags.DEFINE_enum("source", None, sorted(SOURCES), "Dataset adapter.")
    flags.DEFINE_string("input", None, "Root of the downloaded release (local or gs://).")
    flags.DEFINE_string("metadata", None, "Directory of the release's metadata CSVs (default: --input).")
    flags.DEFINE_string("workdir", None, "Output root; the dataset goes to <workdir>/<name>/1.0.0.")
    retired_flags.define_renamed("output", "workdir")
    flags.DEFINE_string("name", None, "Dataset name (default: the source name).")
    flags.DEFINE_integer("size", 512, "Shorter side of the stored images, in pixels.", lower_bound=1)
    flags.DEFINE_enum("dtype", "uint8", ["uint8", "uint16"], "Stored pixel type.")
    flags.DEFINE_enum("format", "array_record", ["array_record", "tfrecord"], "Shard file format.")
    flags.DEFINE_enum("runner", "local", ["local", "beam"], "Where the work runs.")
    flags.DEFINE_integer("workers", None, "Local worker processes (default: CPU count; 1 = in process).")
    flags.DEFINE_integer("chunk_size", 64, "Items per local work unit (resume granularity).", lower_bound=1)
    flags.DEFINE_integer("records_per_shard", 1024, "Target records per shard.", lower_bound=1)
    flags.DEFINE_string(
        "views",
        "frontal",
        "'frontal', 'all', or comma-separated view positions (PA,AP,LL). Views come from the release's metadata;"
        " the folder source reads each DICOM's header (ViewPosition, else View Code Sequence) and keeps PNG/JPEG"
        " files, which have no view.",
    )
    flags.DEFINE_string(
        "modalities", ",".join(quality.DEFAULT_MODALITIES), "Accepted DICOM modalities, comma-separated, or 'all'."
    )
    flags.DEFINE_bool("chest_only", True, "Reject DICOMs whose header names non-chest anatomy.")
    flags.DEFINE_integer("min_size", quality.MIN_SIZE, "Reject images with a shorter side below this.")
    flags.DEFINE_float("noise_threshold", quality.NOISE_CORRELATION, "Reject below this neighbour correlation.")
    flags.DEFINE_bool("dedup", True, "Drop exact and near duplicates (first seen wins).")
    flags.DEFINE_integer(
        "near_duplicate_bits", quality.NEAR_DUPLICATE_BITS, "Perceptual-hash Hamming distance still called a duplicate."
    )
    flags.DEFINE_enum(
        "png_compression",
        "deflate",
        list(records.PNG_COMPRESSIONS),
        "PNG of the stored images: deflate (compressed), or stored (uncompressed: faster, larger).",
    )
    retired_flags.define_renamed(
        "compress_level", "png_compression", "was replaced by --png_compression=deflate|stored"
    )
    flags.DEFINE_list("dedup_against", [], "Datasets built before this one (their hashes.csv).")
    flags.DEFINE_multi_string(
        "source_option", [], "Adapter option KEY=VALUE (VALUE parsed as JSON when it is JSON), e.g. csv=labels.csv."
    )
    flags.DEFINE_string("beam_args", "", "Apache Beam pipeline options, as one shell-quoted string.")
    flags.DEFINE_bool("overwrite", False, "Delete an existing or unfinished build first.")
    flags.DEFINE_bool("keep_work", False, "Keep the .work staging directory after finishing.")
    flags.mark_flags_as_required(["source", "input", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = stages.PrepOptions(
        size=flags.FLAGS.size,
        dtype=flags.FLAGS.dtype,
        file_format=flags.FLAGS.format,
        allowed_modalities=parse_modalities(flags.FLAGS.modalities),
        chest_only=flags.FLAGS.chest_only,
        min_size=flags.FLAGS.min_size,
        noise_threshold=flags.FLAGS.noise_threshold,
        png_compression=flags.FLAGS.png_compression,
        deduplicate=flags.FLAGS.dedup,
        near_duplicate_bits=flags.FLAGS.near_duplicate_bits,
        records_per_shard=flags.FLAGS.records_per_shard,
    )
    source = get_source(
        flags.FLAGS.source,
        flags.FLAGS.input,
        flags.FLAGS.metadata,
        views=parse_views(flags.FLAGS.views),
        **parse_source_options(flags.FLAGS.source_option),
    )
    common = {"name": flags.FLAGS.name, "dedup_against": flags.FLAGS.dedup_against, "overwrite": flags.FLAGS.overwrite}
    if flags.FLAGS.runner == "beam":
        from data_prep import beam_runner

        beam_args = shlex.split(flags.FLAGS.beam_args)
        info = beam_runner.run_beam(
            source, flags.FLAGS.workdir, options, beam_args=beam_args, keep_work=flags.FLAGS.keep_work, **common
        )
    else:
        from data_prep import local_runner

        info = local_runner.run_local(
            source,
            flags.FLAGS.workdir,
            options,
            workers=flags.FLAGS.workers,
            chunk_size=flags.FLAGS.chunk_size,
            keep_work=flags.FLAGS.keep_work,
            **common,
        )
    print(summary(info), file=sys.stdout)


if __name__ == "__main__":
    define_flags()
    app.run(main)
