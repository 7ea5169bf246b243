r"""Audit a built dataset before training on it: counts, bookkeeping, a contact sheet and histograms.

  python -m data_prep.audit PATH [--samples=64] [--seed=0] [--workdir=DIR]

PATH is a dataset version directory (`<root>/<name>/<version>`, holding dataset_info.json or shards)
or a directory above one (`<root>` or `<root>/<name>`); every dataset found is audited. Paths go
through etils.epath, so gs:// works.

For each dataset it prints the shards, records and format of every split (records counted in the shard
files themselves, not taken from dataset_info.json), whether dataset_info.json and the builder's
manifest.json agree with those counts, the reason tally of failures.csv, and the distribution of view
position, source, split field, image size and dtype over a seeded random sample of records. It writes
`contact_sheet.png` (the sampled images), `histograms.png` (their intensity histograms: mean and
10th-90th percentile band) and `audit.json` (the printed numbers) to --workdir, by default the dataset
directory. Any count that does not reconcile is printed loudly and makes the exit status non-zero.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from data_prep import records, retired_flags, writers


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (library imports must not claim flag names)."""
    flags.DEFINE_integer("samples", 64, "Records drawn at random for the pictures and distributions.")
    flags.DEFINE_integer("seed", 0, "Seed of the record sample (same seed, same sample).")
    flags.DEFINE_string("workdir", None, "Output directory for the pictures and audit.json; default: the dataset.")
    retired_flags.define_renamed("out", "workdir")


CELL = 128  # contact sheet cell (px): thumbnails are resized so their longer side fills it
GAP = 2  # white lines between cells, so neighbouring thumbnails stay apart
BINS = 64
BAND = (10, 90)  # percentiles across images of the histogram band
MANIFEST = "manifest.json"
FAILURES = "failures.csv"
SAMPLE_FIELDS = ("view_position", "source", "split")
_COUNT_THREADS = 16  # shard counting is I/O bound (footer or header reads; remote on gs://)


# --- finding datasets and counting ------------------------------------------------------------------


def _is_shard(ds_dir: epath.Path, name: str) -> bool:
    info = writers._template(ds_dir).parse_filename_info(name)
    return info is not None and info.dataset_name == ds_dir.parent.name and info.filetype_suffix in writers.FILE_FORMATS


def is_dataset_dir(path: epath.PathLike) -> bool:
    """Whether `path` is one dataset version: it has dataset_info.json or at least one shard of its own."""
    path = epath.Path(path)
    if (path / "dataset_info.json").exists():
        return True
    return any(_is_shard(path, f.name) for f in path.iterdir())


def find_datasets(path: epath.PathLike, max_depth: int = 2) -> list[epath.Path]:
    """Dataset version directories at or below `path` (depth 2 reaches `<root>/<name>/<version>`)."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")

    def walk(d: epath.Path, depth: int) -> list[epath.Path]:
        if is_dataset_dir(d):
            return [d]
        if depth == 0:
            return []
        children = sorted(c for c in d.iterdir() if not c.name.startswith(".") and c.is_dir())
        return [ds for c in children for ds in walk(c, depth - 1)]

    found = walk(path, max_depth)
    if not found:
        raise ValueError(f"no dataset under {path}: no dataset_info.json or shards within {max_depth} levels")
    return found


@dataclasses.dataclass(frozen=True)
class SplitCount:
    """A split as found on disk: its shards and the records each one holds."""

    format: writers.FileFormat
    paths: tuple[epath.Path, ...]
    shard_records: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    @property
    def records(self) -> int:
        return sum(self.shard_records)


def split_counts(ds_dir: epath.PathLike) -> dict[str, SplitCount]:
    """{split: SplitCount} from the shard files; raises ValueError naming an unfinished split."""
    ds_dir = epath.Path(ds_dir)
    layout = writers.finished_splits(ds_dir)  # raises on missing shards or mixed layouts
    paths = {split: writers.shard_paths(ds_dir, split, n, fmt) for split, (fmt, n) in sorted(layout.items())}
    flat = [p for ps in paths.values() for p in ps]
    with futures.ThreadPoolExecutor(min(_COUNT_THREADS, len(flat))) as pool:
        counts = iter(list(pool.map(writers.count_records, flat)))
    return {
        split: SplitCount(layout[split][0], tuple(ps), tuple(next(counts) for _ in ps)) for split, ps in paths.items()
    }


# --- bookkeeping checks -----------------------------------------------------------------------------


def _int(counts: Mapping[str, Any], key: str, problems: list[str]) -> int:
    value = counts.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"manifest counts.{key} is missing or not an integer: {value!r}")
        return 0
    return value


def reconcile(manifest: Mapping[str, Any], counts: Mapping[str, SplitCount]) -> list[str]:
    """What does not add up between the builder's manifest and the shards; empty when all is consistent.

    Checks that every item the builder saw is accounted for (seen = written + duplicate + near_duplicate
    + rejected + failed), that every listed item was seen or filtered out (listed = view_filtered +
    missing + seen), and that the records the manifest says it wrote per split are what the shards hold.
    """
    problems: list[str] = []
    c = manifest.get("counts", {})
    if not isinstance(c, Mapping):
        return [f"manifest counts is not an object: {c!r}"]
    seen, written = _int(c, "seen", problems), _int(c, "written", problems)
    duplicate, near = _int(c, "duplicate", problems), _int(c, "near_duplicate", problems)
    failed, listed = _int(c, "failed", problems), _int(c, "listed", problems)
    view_filtered, missing = _int(c, "view_filtered", problems), _int(c, "missing", problems)
    rejected_by = c.get("rejected", {})
    if not isinstance(rejected_by, Mapping) or not all(isinstance(v, int) for v in rejected_by.values()):
        problems.append(f"manifest counts.rejected is not a {{reason: int}} object: {rejected_by!r}")
        rejected_by = {}
    rejected = sum(rejected_by.values())
    if problems:
        return problems
    if seen != (accounted := written + duplicate + near + rejected + failed):
        problems.append(
            f"counts.seen={seen} != written+duplicate+near_duplicate+rejected+failed={accounted} "
            f"(written={written}, duplicate={duplicate}, near_duplicate={near}, rejected={rejected}, failed={failed})"
        )
    if listed != (accounted := view_filtered + missing + seen):
        problems.append(
            f"counts.listed={listed} != view_filtered+missing+seen={accounted} "
            f"(view_filtered={view_filtered}, missing={missing}, seen={seen})"
        )
    splits = manifest.get("splits", {})
    if not isinstance(splits, Mapping):
        return [*problems, f"manifest splits is not an object: {splits!r}"]
    for split in sorted(set(splits) | set(counts)):
        if split not in counts:
            problems.append(f"split {split!r}: in manifest.json but has no shards")
            continue
        if split not in splits:
            problems.append(
                f"split {split!r}: has {counts[split].records} records in shards but is not in the manifest"
            )
            continue
        entry = splits[split]
        if not isinstance(entry, Mapping):
            problems.append(f"split {split!r}: manifest entry is not an object: {entry!r}")
            continue
        if (said := entry.get("written")) != counts[split].records:
            problems.append(f"split {split!r}: manifest written={said!r} != {counts[split].records} records in shards")
        if "num_shards" in entry and entry["num_shards"] != counts[split].num_shards:
            problems.append(
                f"split {split!r}: manifest num_shards={entry['num_shards']!r} != {counts[split].num_shards} shards"
            )
    if (in_splits := sum(counts[s].records for s in counts)) != written:
        problems.append(f"counts.written={written} != {in_splits} records in the shards of all splits")
    return problems


def check_dataset_info(ds_dir: epath.PathLike, counts: Mapping[str, SplitCount]) -> list[str]:
    """Where dataset_info.json's shard lengths (what tfds readers trust) differ from the shards."""
    path = epath.Path(ds_dir) / "dataset_info.json"
    if not path.exists():
        return []
    info = json.loads(path.read_text())
    recorded = {s["name"]: [int(n) for n in s.get("shardLengths", [])] for s in info.get("splits", [])}
    problems = []
    for split in sorted(set(recorded) | set(counts)):
        got = list(counts[split].shard_records) if split in counts else None
        if recorded.get(split) != got:
            problems.append(f"split {split!r}: dataset_info.json shardLengths={recorded.get(split)} != shards {got}")
    return problems


def failure_tally(path: epath.PathLike) -> dict[str, int]:
    """{reason: rows} of a builder's failures.csv (header path,reason,message), most frequent first."""
    with epath.Path(path).open("r") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "reason" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'reason' column in header {reader.fieldnames}")
        return dict(collections.Counter(row["reason"] for row in reader).most_common())


# --- sampling ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sampled record and where it lives (index in the split's reading order: shard 0 first)."""

    split: str
    index: int
    record: dict[str, Any]


def sample_keys(counts: Mapping[str, SplitCount], n: int, seed: int) -> list[tuple[str, int]]:
    """(split, index) of `n` records drawn without replacement over all splits, in dataset order."""
    splits = sorted(counts)
    sizes = [counts[s].records for s in splits]
    starts = np.cumsum([0, *sizes])
    total = int(starts[-1])
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(max(n, 0), total), replace=False))
    which = np.searchsorted(starts, chosen, side="right") - 1
    return [(splits[w], int(k - starts[w])) for w, k in zip(which, chosen)]


def _source(path: epath.Path, file_format: str):
    if file_format == "tfrecord":
        return writers.TFRecordDataSource(path)
    import grain  # deferred: grain is heavier to import than the rest of this module needs

    return grain.sources.ArrayRecordDataSource([str(path)])


def read_records(counts: Mapping[str, SplitCount], keys: Sequence[tuple[str, int]]) -> list[Sample]:
    """The decoded records at `keys`; opens only the shards that hold one of them."""
    by_shard: dict[tuple[str, int], list[tuple[int, int]]] = collections.defaultdict(list)  # -> [(key pos, i)]
    for pos, (split, index) in enumerate(keys):
        starts = np.cumsum([0, *counts[split].shard_records])
        if not 0 <= index < starts[-1]:
            raise IndexError(f"split {split!r} has {starts[-1]} records, no index {index}")
        shard = int(np.searchsorted(starts, index, side="right") - 1)
        by_shard[(split, shard)].append((pos, index - int(starts[shard])))
    out: list[Sample | None] = [None] * len(keys)
    for (split, shard), wanted in sorted(by_shard.items()):
        source = _source(counts[split].paths[shard], counts[split].format)
        try:
            for pos, i in wanted:
                out[pos] = Sample(split, keys[pos][1], records.decode_record(source[i]))
        finally:
            if hasattr(source, "close"):
                source.close()
    return out  # type: ignore[return-value]


def sample_records(counts: Mapping[str, SplitCount], n: int, seed: int) -> list[Sample]:
    """`n` random records (all if fewer), reproducible for a seed, in dataset order."""
    return read_records(counts, sample_keys(counts, n, seed))


# --- pictures ---------------------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit view of a stored image: uint16 covers its full range (the decoder's [0, 1] scale), / 257."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(x * 255 / 65535)


def thumbnail(image: np.ndarray, cell: int = CELL) -> np.ndarray:
    """The image as uint8, resized (bilinear) so its longer side is `cell`, aspect ratio kept."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(to_uint8(image)).resize(size, Image.Resampling.BILINEAR))


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for n cells."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def cell_box(k: int, n: int, cell: int = CELL, gap: int = GAP) -> tuple[int, int]:
    """(top, left) pixel of cell k in a contact sheet of n images."""
    _, cols = grid_shape(n)
    r, c = divmod(k, cols)
    return gap + r * (cell + gap), gap + c * (cell + gap)


def contact_sheet(images: Sequence[np.ndarray], cell: int = CELL, gap: int = GAP) -> np.ndarray:
    """(H, W) uint8 grid of thumbnails, row by row, each centred on black in its cell, white between cells."""
    if not images:
        raise ValueError("no images for a contact sheet")
    rows, cols = grid_shape(len(images))
    sheet = np.full((gap + rows * (cell + gap), gap + cols * (cell + gap)), 255, np.uint8)
    for k, image in enumerate(images):
        top, left = cell_box(k, len(images), cell, gap)
        sheet[top : top + cell, left : left + cell] = 0
        thumb = thumbnail(image, cell)
        th, tw = thumb.shape
        y, x = top + (cell - th) // 2, left + (cell - tw) // 2
        sheet[y : y + th, x : x + tw] = thumb
    return sheet


def intensity_histograms(images: Sequence[np.ndarray], bins: int = BINS) -> np.ndarray:
    """(N, bins) fraction of each image's pixels per bin of value / dtype max in [0, 1] (last bin closed).

    Normalising by the dtype range (not the image's own range) keeps under- or over-exposed images
    visible as such, and puts uint8 and uint16 datasets on one axis.
    """
    out = np.zeros((len(images), bins), np.float64)
    for k, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype not in records.IMAGE_DTYPES:
            raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
        top = int(np.iinfo(image.dtype).max)
        per_value = np.bincount(image.ravel(), minlength=top + 1)
        bin_of = np.minimum(np.arange(top + 1, dtype=np.int64) * bins // top, bins - 1)  # floor(v / top * bins)
        out[k] = np.bincount(bin_of, weights=per_value, minlength=bins) / image.size
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def histogram_plot(
    hists: np.ndarray, band: tuple[float, float] = BAND, size: tuple[int, int] = (720, 420)
) -> np.ndarray:
    """(H, W, 3) uint8 plot: mean histogram as a line over the percentile band across images."""
    hists = np.asarray(hists, np.float64)
    n, bins = hists.shape
    mean = hists.mean(axis=0)
    lo, hi = np.percentile(hists, band, axis=0)
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    ymax = float(max(hi.max(), mean.max())) or 1.0
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * (width - left - right), height - bottom - y / ymax * (height - top - bottom)

    def steps(values: np.ndarray) -> list[tuple[float, float]]:
        return [xy(x, v) for b, v in enumerate(values) for x in (b / bins, (b + 1) / bins)]

    draw.polygon(steps(hi) + steps(lo)[::-1], fill=(190, 210, 240))
    draw.line(steps(mean), fill=(20, 60, 160), width=2)
    x0, y0 = xy(0, 0)
    x1, y1 = xy(1, ymax)
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = xy(t, 0)
        draw.line([(x, y0), (x, y0 + 5)], fill="black")
        draw.text((x, y0 + 7), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in (0.0, ymax / 2, ymax):
        _, y = xy(0, t)
        draw.line([(x0 - 5, y), (x0, y)], fill="black")
        draw.text((x0 - 7, y), f"{t:.3g}", fill="black", font=font, anchor="rm")
    draw.text((xy(0.5, 0)[0], height - 6), "intensity / dtype max", fill="black", font=font, anchor="md")
    draw.text((x0 - 7, 6), "fraction of pixels", fill="black", font=font, anchor="la")
    title = f"{n} images, {bins} bins: mean (line), {band[0]:g}-{band[1]:g}th percentile (band)"
    draw.text((x1, 6), title, fill="black", font=font, anchor="ra")
    return np.asarray(img)


# --- report -----------------------------------------------------------------------------------------


def _stats(values: Sequence[int]) -> dict[str, float]:
    return {"min": int(np.min(values)), "median": float(np.median(values)), "max": int(np.max(values))}


def sample_summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """Distributions over the sampled records: text fields, dtype, stored height and width."""
    if not samples:
        return {"n": 0}
    recs = [s.record for s in samples]
    summary: dict[str, Any] = {"n": len(recs)}
    for field in SAMPLE_FIELDS:
        summary[field] = dict(collections.Counter(r[field] for r in recs).most_common())
    summary["dtype"] = dict(collections.Counter(r["image"].dtype.name for r in recs).most_common())
    summary["height"] = _stats([r["image"].shape[0] for r in recs])
    summary["width"] = _stats([r["image"].shape[1] for r in recs])
    return summary


def _write_png(path: epath.Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def audit_dataset(ds_dir: epath.PathLike, out_dir: epath.PathLike, samples: int, seed: int) -> dict[str, Any]:
    """Everything `main` prints for one dataset, as JSON-able data; writes the pictures and audit.json."""
    ds_dir, out_dir = epath.Path(ds_dir), epath.Path(out_dir)
    counts = split_counts(ds_dir)
    report: dict[str, Any] = {
        "path": str(ds_dir),
        "format": next(iter(counts.values())).format,
        "splits": {s: {"shards": c.num_shards, "records": c.records} for s, c in counts.items()},
        "total": {
            "shards": sum(c.num_shards for c in counts.values()),
            "records": sum(c.records for c in counts.values()),
        },
    }
    problems = check_dataset_info(ds_dir, counts)
    report["manifest"] = None
    if (ds_dir / MANIFEST).exists():
        manifest = json.loads((ds_dir / MANIFEST).read_text())
        report["manifest"] = {"counts": manifest.get("counts"), "splits": manifest.get("splits")}
        problems += reconcile(manifest, counts)
    report["problems"] = problems
    report["failures"] = failure_tally(ds_dir / FAILURES) if (ds_dir / FAILURES).exists() else None
    picked = sample_records(counts, samples, seed)
    report["sample"] = {"seed": seed, "keys": [[s.split, s.index] for s in picked], **sample_summary(picked)}
    report["files"] = []
    if picked:
        images = [s.record["image"] for s in picked]
        hists = intensity_histograms(images)
        lo, hi = np.percentile(hists, BAND, axis=0)
        report["histogram"] = {
            "bins": BINS,
            "band_percentiles": list(BAND),
            "mean": hists.mean(axis=0).tolist(),
            "low": lo.tolist(),
            "high": hi.tolist(),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_png(out_dir / "contact_sheet.png", contact_sheet(images))
        _write_png(out_dir / "histograms.png", histogram_plot(hists))
        report["files"] = [str(out_dir / "contact_sheet.png"), str(out_dir / "histograms.png")]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    report["files"].append(str(out_dir / "audit.json"))
    return report


def _tally(counter: Mapping[str, int], total: int) -> str:
    return ", ".join(f"{k or '(empty)'} {v} ({100 * v / total:.0f}%)" for k, v in counter.items())


def format_report(report: Mapping[str, Any]) -> str:
    """The human-readable text of one dataset's report."""
    lines = [f"== {report['path']} ({report['format']})", f"  {'split':<16}{'shards':>8}{'records':>12}"]
    for split, c in report["splits"].items():
        lines.append(f"  {split:<16}{c['shards']:>8}{c['records']:>12}")
    lines.append(f"  {'total':<16}{report['total']['shards']:>8}{report['total']['records']:>12}")
    if report["manifest"] is None:
        lines.append("  manifest.json: none")
    else:
        c = report["manifest"]["counts"] or {}
        lines.append("  manifest.json: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "rejected"))
        lines.append(f"    rejected: {c.get('rejected') or {}}")
    if report["problems"]:
        lines += ["", "  " + "!" * 30 + " COUNTS DO NOT RECONCILE " + "!" * 30]
        lines += [f"  !! {p}" for p in report["problems"]]
        lines.append("  " + "!" * 85 + "\n")
    elif report["manifest"] is not None:
        lines.append("    reconciles: seen, listed and per-split written agree with the shards")
    if report["failures"] is not None:
        n = sum(report["failures"].values())
        lines.append(f"  failures.csv: {n} rows" + (f": {_tally(report['failures'], n)}" if n else ""))
    s = report["sample"]
    lines.append(f"  sample: {s['n']} of {report['total']['records']} records (seed {s['seed']})")
    if s["n"]:
        for field in (*SAMPLE_FIELDS, "dtype"):
            lines.append(f"    {field}: {_tally(s[field], s['n'])}")
        for dim in ("height", "width"):
            d = s[dim]
            lines.append(f"    {dim}: min {d['min']}, median {d['median']:g}, max {d['max']}")
    lines.append("  wrote " + ", ".join(report["files"]))
    return "\n".join(lines)


def run(paths: list[str], samples: int = 64, seed: int = 0, workdir: str | None = None) -> None:
    """Inspects every dataset under `paths`; exits non-zero naming each problem found."""
    try:
        found = [ds for path in paths for ds in find_datasets(path)]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"audit: {e}")
    failed = []
    for ds_dir in found:
        out_dir = ds_dir if workdir is None else epath.Path(workdir)
        if workdir is not None and len(found) > 1:  # one subdirectory each, so they do not overwrite each other
            out_dir = out_dir / ds_dir.parent.name / ds_dir.name
        try:
            report = audit_dataset(ds_dir, out_dir, samples, seed)
        except (FileNotFoundError, ValueError) as e:
            print(f"== {ds_dir}\n  ERROR: {e}")
            failed.append(f"{ds_dir}: {e}")
            continue
        print(format_report(report), flush=True)
        failed += [f"{ds_dir}: {p}" for p in report["problems"]]
    if failed:
        sys.exit(f"audit: {len(failed)} problem(s):\n  " + "\n  ".join(failed))


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("no PATH given")
    run(argv[1:], flags.FLAGS.samples, flags.FLAGS.seed, flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
