"""Throughput of the per-item data-preparation transform on one core, next to the decode-only floor.

For every input file three things are timed, interleaved, --repeats times each:

* floor: reading and decoding the pixels alone, `pydicom.dcmread(force=True)` + `ds.pixel_array`
  (through `decode_dicom.read_dicom`, which also sets the Transfer Syntax of ACR-NEMA files), or for
  PNG/JPEG `PIL.Image.open` + `np.asarray`;
* full: what the pipeline does per item, `decode.convert_file(path, size, dtype)` with the default
  gates (decode, Modality LUT, VOI or percentile window, polarity, quality gates, Lanczos resize
  to the shorter side `size`, pixel SHA-256, perceptual hash) then `records.encode_record` (PNG +
  tf.train.Example);
* stages: the same transform called step by step (the steps `convert_file` is made of, checked to
  give the same image), to show where the time goes: read+decode, gates (blank, noise),
  display (Modality LUT / VOI / polarity, or PNG scaling), resize (+ quantisation), hashes (source
  and output SHA-256, pHash), png (encode), serialize (record normalisation + Example).

Figures are per file and per category (uncompressed, J2K, JPEG-LS, ... DICOM; PNG): images/s is
files / summed best time, ratio = full images/s / floor images/s (= floor time / full time). Best
(minimum) times are reported because the machine may be shared: the minimum is the run least
disturbed by other processes; the JSON also holds every sample.

Run as a script it limits BLAS/OpenMP to one thread, so figures are per core (one process).

The default inputs are the test files (tests/data, real DICOMs, see tests/data/dicom/SOURCES.md)
plus derived files written to a temporary directory: the RG1 chest (J2K lossy, 1955 x 1841,
15-bit) re-written as uncompressed Explicit VR Little Endian DICOM (real uncompressed chest DICOMs
are 2-3k px, 12-16 bit, larger than the uncompressed test files), and the NIH ChestX-ray14 DICOM's
pixels as an 8-bit 1024 x 1024 PNG (the format that dataset is distributed in).

Usage, from the repository root (files given as arguments are measured after the default inputs,
category by format; --no_defaults measures only them):
    python -m bench.prep_throughput --repeats=5 --out=/tmp/prep.json
    python -m bench.prep_throughput --no_defaults tests/data/kermany_pediatric_pneumonia/images/*

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one thread per process, set before numpy loads BLAS/OpenMP
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[_var] = "1"

import contextlib
import gc
import json
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import PIL
import pydicom
from absl import app, flags
from PIL import Image
from pydicom.uid import UID

from chexfound_jax import cli
from data_prep import decode, decode_common, decode_dicom, decode_image, quality, records, retired_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CHEST = DATA / "dicom" / "chest"
DEFAULT_FILES = (
    CHEST / "cxr_dx_sc_mono2_8bit_implicitLE_nih_cxr14_via_gcp.dcm",
    CHEST / "derived_cxr_cr_mono1_10bit_explicitLE_part10_from_CR-MONO1-10-chest.dcm",
    CHEST / "cxr_cr_pa_mono1_15bit_j2k_lossy_nema_RG1_J2KI.dcm",
    CHEST / "cxr_dx_mono2_16bit_j2k_lossless_pixel_sign_plus1_looks_inverted_gdcm_DX_J2K_0Padding_DEID.dcm",
    CHEST / "cxr_cr_pa_mono1_15bit_jpegls_nearlossless_nema_RG1_JLSN.dcm",
    CHEST / "cxr_cr_pa_mono2_8bit_jpeg_baseline_siim_pneumothorax.dcm",
    *sorted((DATA / "images").glob("*.png")),
)
# Derived inputs (written to a temporary directory): (category, name, source file, how).
DERIVED = (
    ("uncompressed_derived", "derived_RG1_uncompressed_explicitLE_16bit.dcm", DEFAULT_FILES[2], "dicom"),
    ("png_derived", "derived_nih_cxr14_1024_gray8.png", DEFAULT_FILES[0], "png"),
)
STAGES = ("read+decode", "gates", "display", "resize", "hashes", "png", "serialize")
_J2K = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202")
_J2K += ("1.2.840.10008.1.2.4.203",)
_JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
RENAMED = {"json": "out", "compress_level": "png_compression"}  # old flag -> new (data_prep.retired_flags)
RENAMED_HOW = {"compress_level": "was replaced by --png_compression=deflate|stored"}  # as data_prep.build says


def category(path: str | os.PathLike) -> str:
    """uncompressed / j2k / jpegls / jpeg / rle / other for DICOM (by Transfer Syntax); png / jpeg_image."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".png":
        return "png"
    if suffix in (".jpg", ".jpeg"):
        return "jpeg_image"
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not UID(syntax).is_encapsulated:
        return "uncompressed"
    if syntax in _J2K:
        return "j2k"
    if syntax in _JPEG_LS:
        return "jpegls"
    if syntax == "1.2.840.10008.1.2.5":
        return "rle"
    return "jpeg" if syntax.startswith("1.2.840.10008.1.2.4.") else "other"


def write_derived(directory: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """The derived inputs of DERIVED, written to `directory`: [(category, path)]."""
    out = []
    for cat, name, src, kind in DERIVED:
        path = directory / name
        if kind == "dicom":  # same pixels and header, uncompressed Explicit VR Little Endian
            ds = pydicom.dcmread(src)
            ds.decompress()
            ds.save_as(path, enforce_file_format=True)
        else:  # the stored 8-bit pixels as a grayscale PNG
            Image.fromarray(pydicom.dcmread(src).pixel_array).save(path, compress_level=6)
        out.append((cat, path))
    return out


def record_example(image: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """The record the pipeline writes for one converted file (no labels)."""
    rows, cols = meta["original_size"]
    text = ("source", "path", "patient_id", "study_id", "image_id", "view_position", "photometric")
    return {
        "image": image,
        **{k: meta[k] or "" for k in text},
        "sha256": meta["pixel_sha256"],
        "split": "train",
        "bits_stored": int(meta["bits_stored"] or 0),
        "original_height": int(rows),
        "original_width": int(cols),
        "pixel_spacing": list(meta["pixel_spacing"] or ()),
        "labels": [],
    }


def floor(path: pathlib.Path) -> np.ndarray:
    """Decode-only: the pixels as the decoder library returns them."""
    if decode._is_image_file(path):
        with Image.open(path) as img:
            return np.asarray(img)
    return decode_dicom.read_dicom(path).pixel_array


def full(path: pathlib.Path, size: int, dtype: str, png_compression: records.PngCompression) -> bytes:
    """The pipeline's per-item transform: convert_file + encode_record."""
    image, meta = decode.convert_file(path, size=size, dtype=dtype)
    return records.encode_record(record_example(image, meta), png_compression=png_compression)


class _Clock:
    def __init__(self):
        self.times: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[stage] += time.perf_counter() - t0


def staged(
    path: pathlib.Path, size: int, dtype: str, png_compression: records.PngCompression
) -> tuple[dict[str, float], np.ndarray]:
    """convert_file + encode_record step by step with default gates: (seconds per stage, output image)."""
    clock, name = _Clock(), os.fspath(path)
    if decode._is_image_file(path):
        with clock("read+decode"):
            arr, bits, fmt = decode_image.read_image(path)
        with clock("gates"):
            gray = decode_common._gray(arr, name, decode_common.RGB_TOLERANCE * (2**bits - 1) / 255)
            corr = decode_common.pixel_gates(gray, name, quality.NOISE_CORRELATION)
        with clock("display"):
            pixels = decode_common.unit_pixels(gray, bits)
            decode_common.size_gate(pixels.shape, name, quality.MIN_SIZE)
            meta = dict.fromkeys(decode_common.METADATA_KEYS) | {"path": name, "format": fmt, "bits_stored": bits}
            meta |= {"original_size": pixels.shape, "neighbour_correlation": round(corr, 4)}
        source = gray
    else:
        with clock("read+decode"):
            ds = decode_dicom.read_dicom(path)
            decode_dicom.check_header(ds, name, quality.DEFAULT_MODALITIES, True)
            stored = decode_dicom.decode_pixels(ds, name)
        with clock("gates"):
            corr = decode_common.pixel_gates(stored, name, quality.NOISE_CORRELATION)
        with clock("display"):
            pixels, display = decode_dicom.display_pixels(stored, ds)
            meta = decode_dicom.dicom_metadata(ds, name, "") | display | {"neighbour_correlation": round(corr, 4)}
            decode_common.size_gate(pixels.shape, name, quality.MIN_SIZE)
        source = stored
    with clock("resize"):
        image = decode.to_output(decode_common.Decoded(pixels, meta), size, dtype)
    with clock("hashes"):
        meta |= {"source_pixel_sha256": quality.pixel_sha256(source), "pixel_sha256": quality.pixel_sha256(image)}
        meta |= {"phash": f"{quality.perceptual_hash(image):016x}"}
    with clock("png"):
        png = records.encode_png(image, png_compression)
    with clock("serialize"):
        records.serialize_record(records.normalize_record(record_example(image, meta)), png)
    return clock.times, image


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(
    path: pathlib.Path, size: int, dtype: str, png_compression: records.PngCompression, repeats: int
) -> dict[str, Any]:
    """Floor, full and staged times of one file (seconds, every sample), after one untimed warm-up."""
    image, meta = decode.convert_file(path, size=size, dtype=dtype)  # warm-up; raises Rejected
    stage_times, staged_image = staged(path, size, dtype, png_compression)
    if not np.array_equal(image, staged_image):
        raise AssertionError(f"{path}: the staged transform differs from convert_file; update staged()")
    floor(path)
    floors, fulls, stages = [], [], {s: [] for s in STAGES}
    for _ in range(repeats):  # interleaved, so that load changes hit all three alike
        gc.collect()
        floors.append(_timed(lambda: floor(path)))
        fulls.append(_timed(lambda: full(path, size, dtype, png_compression)))
        stage_times, _ = staged(path, size, dtype, png_compression)
        for s in STAGES:
            stages[s].append(stage_times[s])
    return {
        "shape": list(meta["original_size"]),
        "bits_stored": meta["bits_stored"],
        "output_shape": list(image.shape),
        "floor_s": floors,
        "full_s": fulls,
        "stages_s": stages,
    }


def summarise(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Category figures from its files' best times: images/s = files / summed best time."""
    floor_s = sum(min(i["floor_s"]) for i in items)
    full_s = sum(min(i["full_s"]) for i in items)
    stage_ms = {s: 1e3 * sum(statistics.median(i["stages_s"][s]) for i in items) / len(items) for s in STAGES}
    return {
        "files": len(items),
        "floor_images_per_s": len(items) / floor_s,
        "full_images_per_s": len(items) / full_s,
        "ratio": floor_s / full_s,
        "floor_ms": 1e3 * floor_s / len(items),
        "full_ms": 1e3 * full_s / len(items),
        "full_median_ms": 1e3 * sum(statistics.median(i["full_s"]) for i in items) / len(items),
        "stage_median_ms": stage_ms,
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    threads = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    versions = {"numpy": np.__version__, "pillow": PIL.__version__, "pydicom": pydicom.__version__}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(), **versions}


def run(
    inputs: Sequence[tuple[str, pathlib.Path]],
    *,
    size: int,
    dtype: str,
    png_compression: records.PngCompression,
    repeats: int,
) -> dict[str, Any]:
    """Figures for [(category, path)]; files the default gates reject are listed under `rejected`."""
    load_before = os.getloadavg()[0]
    files, rejected = {}, {}
    for cat, path in inputs:
        try:
            files[os.fspath(path)] = {"category": cat} | measure(path, size, dtype, png_compression, repeats)
        except decode.Rejected as e:
            rejected[os.fspath(path)] = e.reason
    categories = {}
    for cat in dict.fromkeys(f["category"] for f in files.values()):
        categories[cat] = summarise([f for f in files.values() if f["category"] == cat])
    return {
        "machine": machine(),
        "settings": {"size": size, "dtype": dtype, "png_compression": png_compression, "repeats": repeats},
        "load_average": [load_before, os.getloadavg()[0]],
        "categories": categories,
        "files": files,
        "rejected": rejected,
    }


def report(result: dict[str, Any]) -> str:
    m, st = result["machine"], result["settings"]
    lines = [
        f"CPU {m['cpu']!r}, {m['cores']} cores, threads {m['threads']}; numpy {m['numpy']}, Pillow {m['pillow']},"
        f" pydicom {m['pydicom']}; size {st['size']} {st['dtype']}, png {st['png_compression']},"
        f" best of {st['repeats']}; load average {result['load_average'][0]:.2f} -> {result['load_average'][1]:.2f}",
        "",
        "| category | files | floor img/s | full img/s | ratio | floor ms | full ms (best / median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cat, c in result["categories"].items():
        lines.append(
            f"| {cat} | {c['files']} | {c['floor_images_per_s']:.1f} | {c['full_images_per_s']:.1f} | {c['ratio']:.2f}"
            f" | {c['floor_ms']:.1f} | {c['full_ms']:.1f} / {c['full_median_ms']:.1f} |"
        )
    lines += ["", "Median ms per stage (mean over the category's files):", ""]
    lines += ["| category | " + " | ".join(STAGES) + " | sum |", "|---" * (len(STAGES) + 2) + "|"]
    for cat, c in result["categories"].items():
        ms = c["stage_median_ms"]
        lines.append(f"| {cat} | " + " | ".join(f"{ms[s]:.1f}" for s in STAGES) + f" | {sum(ms.values()):.1f} |")
    lines += ["", "| file | category | shape | bits | floor ms | full ms | ratio |", "|---|---|---|---|---|---|---|"]
    for path, f in result["files"].items():
        fl, fu = 1e3 * min(f["floor_s"]), 1e3 * min(f["full_s"])
        shape = "x".join(map(str, f["shape"]))
        name = pathlib.Path(path).name
        lines.append(
            f"| {name} | {f['category']} | {shape} | {f['bits_stored']} | {fl:.1f} | {fu:.1f} | {fl / fu:.2f} |"
        )
    for path, reason in result["rejected"].items():
        lines.append(f"rejected by the default gates ({reason}): {path}")
    return "\n".join(lines)


def default_inputs(directory: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    real = [(category(p), p) for p in DEFAULT_FILES]
    derived = write_derived(directory)
    order = ("uncompressed", "uncompressed_derived", "j2k", "jpegls", "jpeg", "png", "png_derived")
    return sorted(real + derived, key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_bool("no_defaults", False, "Measure only the files given as arguments, not the default inputs.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed runs per file (best and median reported).", lower_bound=1, **fv)
    flags.DEFINE_integer("size", 512, "Shorter side of the output image (data_prep.build --size).", lower_bound=1, **fv)
    flags.DEFINE_enum("dtype", "uint8", ["uint8", "uint16"], "Output pixel type (data_prep.build --dtype).", **fv)
    compression = list(records.PNG_COMPRESSIONS)
    flags.DEFINE_enum("png_compression", "deflate", compression, "data_prep.build --png_compression.", **fv)
    flags.DEFINE_string("out", None, "Also write every figure and sample to this JSON file.", **fv)
    for old, new in RENAMED.items():
        retired_flags.define_renamed(old, new, RENAMED_HOW.get(old, ""), flag_values=flag_values)


def bench(files: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """Measures the default inputs (unless --no_defaults) and `files`; prints the tables, writes --out."""
    if fv.no_defaults and not files:
        raise app.UsageError("--no_defaults and no files given: nothing to measure")
    with tempfile.TemporaryDirectory(prefix="prep_bench_") as tmp:
        inputs = [] if fv.no_defaults else default_inputs(pathlib.Path(tmp))
        inputs += [(category(p), pathlib.Path(p)) for p in files]
        result = run(inputs, size=fv.size, dtype=fv.dtype, png_compression=fv.png_compression, repeats=fv.repeats)
    print(report(result))
    if fv.out:
        pathlib.Path(fv.out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str]) -> None:
    bench(argv[1:])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
