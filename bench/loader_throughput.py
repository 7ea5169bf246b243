"""Input pipeline throughput: our grain pipeline against the official torchvision DataAugmentationDINO.

Both sides produce the same thing from the same pixels: per image 2 global crops + N local crops of the
DINOv2 multi-crop augmentation (official data/augmentations.py), collated into batches of --batch_size images
(crop-major, as the official collate) with the iBOT masks of the official collate.

- ours-device: `pipeline.training_dataset` with `data.photometric="device"`. The host decodes the record,
  cuts and resizes the crops, draws the photometric parameters and the masks; jitter, blur, solarize and
  normalisation run later in `pipeline.finish_on_device` on the accelerator (timed separately here, on the
  CPU, which says little about an accelerator).
- ours-host: the same with `data.photometric="host"`: everything on the host, float32 RGB crops out.
- torchvision: the official recipe in bench/loader_torchvision.py, run by another interpreter
  (--torchvision_python, a virtualenv with torch and torchvision; that file imports only torch, torchvision,
  numpy, PIL, the standard library and bench/cpu_timing.py, and reads its cells as JSON on stdin). A
  map-style dataset reads a PNG file, decodes it with `Image.open(...).convert("RGB")` and applies
  `DataAugmentationDINO` (dinov2/data/augmentations.py: RandomResizedCrop bicubic + flip, ColorJitter(0.4,
  0.4, 0.2, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur(9, sigma 0.1-2) through the official wrapper that
  applies 1 - p, Solarize(128) p 0.2 on global crop 2, ToTensor, Normalize), in a torch DataLoader with an
  infinite shuffling sampler and the official `collate_data_and_cast` (stack crop-major, masks, cast to
  float16). The masks of both sides come from `chexfound_jax.ssl.masking.collate_masks` (loaded from its
  file: it needs only numpy), so the comparison is about the image work.

Data: by default the bundled Kermany X-rays (tests/data/kermany, 24 images of about 256 px) are built
into a data_prep dataset with --prep_size (512: upsampled to a 512 px shorter side, as the official
pre-resized 512 px images). --dataset points at a built dataset instead. The bench writes each record's
PNG bytes (the same bytes the record holds) to a folder that the torchvision side reads, so both decode
identical PNGs with Pillow; ours also parses the tf.train.Example around it.

Measurement: each cell (config x implementation x workers) starts its iterator, consumes warm-up batches
(worker start-up excluded), then times --repeats consecutive windows of --images images each. Per window,
wall time and the CPU time (user + system, from /proc) of the whole process tree: the main process and
all its descendants (loader workers). "images/s per core" is images per CPU-second, which does not
depend on how many cores the cell got on a shared machine; "cores" is CPU-seconds per wall-second.
Workers = 0 means everything in the main process: torch with 1 intra-op thread (as in its DataLoader
workers), ours with --read_threads grain threads (default 1; each grain thread makes a whole batch, so
the configs' 16 threads would keep 16 batches in flight and make short windows meaningless on a few
cores). Medians and bests over the windows are reported; the machine's load shows in "cores".

Usage, from the repository root with the dev virtualenv active:
    python -m bench.loader_throughput --torchvision_python=~/tv-venv/bin/python
    python -m bench.loader_throughput --crop_sizes=224/96 --workers=0 --images=40 --repeats=5 --out=out.json
    python -m bench.loader_throughput --config=configs/pretrain/tiny_cpu.py --config.crops.local_crops_number=4 \
        --crop_sizes=config

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from bench.cpu_timing import measure, plan, summarize
from chexfound_jax import cli
from data_prep import retired_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "vitl16_512.py"
KERMANY = REPO / "tests" / "data" / "kermany"
MASKING_PY = REPO / "chexfound_jax" / "ssl" / "masking.py"
TORCHVISION_PY = REPO / "bench" / "loader_torchvision.py"  # the torchvision side
IMPLS = ("ours-device", "ours-host", "torchvision")
RENAMED = {"json": "out", "batch": "batch_size", "sizes": "crop_sizes"}  # old flag -> new (data_prep.retired_flags)

# ---------------------------------------------------------------------------------------------------
# Our side (the dev virtualenv).
# ---------------------------------------------------------------------------------------------------


CropSizes = tuple[int, int] | None  # (global, local) pixels; None: the config's own


@dataclasses.dataclass(frozen=True)
class Options:
    """What a run measures: the command line, typed (defaults as the flags')."""

    crop_sizes: tuple[CropSizes, ...] = ((512, 144), (224, 96))
    images: int = 30  # per timed window
    repeats: int = 3  # timed windows per cell
    workers: tuple[int, ...] = (0, 2)
    batch_size: int = 10  # the official per-GPU batch at 512
    read_threads: int = 1
    read_buffer: int = 2
    dataset: str | None = None  # None: the bundled Kermany images, built at prep_size
    split: str = "train"
    prep_size: int = 512
    export_limit: int = 1024
    torchvision_python: str | None = None
    device_repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        if min(self.images, self.repeats, self.batch_size) < 1 or not self.workers or min(self.workers) < 0:
            raise ValueError("--images, --repeats and --batch_size must be positive and --workers non-negative")


def parse_crop_sizes(text: str) -> list[CropSizes]:
    """'512/144,224/96' -> [(512, 144), (224, 96)]; 'config' -> [None] (the config's own crop sizes)."""
    out: list[CropSizes] = []
    for item in text.split(","):
        item = item.strip()
        if item == "config":
            out.append(None)
            continue
        g, sep, s = item.partition("/")
        if not sep or not g.isdigit() or not s.isdigit() or int(g) < 1 or int(s) < 1:
            raise ValueError(f"--crop_sizes wants comma-separated GLOBAL/LOCAL pixel sizes or 'config', got {text!r}")
        out.append((int(g), int(s)))
    return out


def bench_config(base: Any, size: CropSizes, photometric: str, options: Options, dataset: str) -> Any:
    """The config of one cell: crop sizes, photometric mode, one group of --batch_size images per batch."""
    cfg = base.copy_and_resolve_references()
    if size is not None:
        cfg.crops.global_crops_size, cfg.crops.local_crops_size = size
    cfg.data.update(
        datasets=(dataset,), photometric=photometric, read_threads=options.read_threads, read_buffer=options.read_buffer
    )
    cfg.train.update(global_batch_size=options.batch_size, batch_groups=1)
    return cfg


def size_name(cfg: Any) -> str:
    return f"{cfg.crops.global_crops_size}/{cfg.crops.local_crops_size}"


def build_kermany(out: pathlib.Path, prep_size: int) -> pathlib.Path:
    """The bundled Kermany X-rays as a data_prep dataset, shorter side `prep_size`."""
    from data_prep import local_runner, writers
    from data_prep import stages as prep
    from data_prep.sources import get_source

    source = get_source(
        "folder", str(KERMANY), csv="labels.csv", path_column="file", label_columns=["label"], source_name="kermany"
    )
    local_runner.run_local(source, out, prep.PrepOptions(size=prep_size, min_size=200), workers=1, progress=False)
    return pathlib.Path(os.fspath(writers.dataset_dir(out, "kermany", prep.DATASET_VERSION)))


def export_pngs(dataset: str, split: str, out: pathlib.Path, limit: int) -> dict[str, Any]:
    """Writes the PNG of each record (its stored bytes; 16-bit ones reduced to 8 bits as the pipeline does)."""
    import numpy as np
    import tensorflow_datasets as tfds

    from chexfound_jax.data import pipeline
    from data_prep import records

    source = pipeline.ShardedSource([dataset], split)
    n = min(len(source), limit)
    if n < 1:
        raise ValueError(f"{dataset} split {split!r} has no records to export")
    out.mkdir(parents=True, exist_ok=True)
    shapes = []
    features = records.record_features()
    for i in range(n):
        png = features.deserialize_example_np(source[i], decoders={"image": tfds.decode.SkipDecoding()})["image"]
        image = records.decode_png(png)
        if image.dtype == np.uint16:
            png = records.encode_png(np.round(image.astype(np.float32) / 257.0).astype(np.uint8))
        (out / f"{i:06d}.png").write_bytes(png)
        shapes.append(image.shape)
    heights, widths = [s[0] for s in shapes], [s[1] for s in shapes]
    return {
        "records": len(source),
        "exported": n,
        "height": [min(heights), max(heights)],
        "width": [min(widths), max(widths)],
        "dtype": str(image.dtype),
    }


def ours_cell(cfg: Any, workers: int, options: Options, keep: list | None = None) -> dict[str, Any]:
    from chexfound_jax.data import pipeline

    t0 = time.perf_counter()
    layout = pipeline.train_layout(cfg, num_batch_shards=1, process_count=1)
    it = iter(pipeline.training_dataset(cfg, layout, process_index=0, num_workers=workers))
    warmup, window = plan(options.images, options.batch_size, workers)
    if keep is not None:
        keep.append(next(it))
        warmup = max(0, warmup - 1)
    windows = measure(it, batch=options.batch_size, warmup=warmup, window_batches=window, windows=options.repeats)
    close = getattr(it, "close", None)
    if close is not None:
        close()
    del it
    cell = {"size": size_name(cfg), "impl": f"ours-{cfg.data.photometric}", "workers": workers, **summarize(windows)}
    return {**cell, "cell_s": time.perf_counter() - t0}


def time_finish_on_device(cfg: Any, batch: dict, repeats: int) -> dict[str, float]:
    """jax.jit(finish_on_device) on this machine's default device (the CPU here), on one batch."""
    import jax

    from chexfound_jax.data import pipeline

    fn = jax.jit(lambda b: pipeline.finish_on_device(b, cfg))
    arrays = jax.device_put({k: v for k, v in batch.items() if k != "skipped"})
    t0 = time.perf_counter()
    compiled = fn.lower(arrays).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(arrays))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(arrays))
        times.append(time.perf_counter() - t0)
    n = batch["global_crops"].shape[0] * batch["global_crops"].shape[1] // 2  # (groups, 2b, S, S)
    step = statistics.median(times)
    return {
        "size": size_name(cfg),
        "device": str(jax.devices()[0].device_kind),
        "compile_s": compile_s,
        "batch_s": step,
        "batch_s_best": min(times),
        "ms_per_image": 1e3 * step / n,
        "images_per_s": n / step,
    }


def machine_info() -> dict[str, Any]:
    import grain
    import jax
    import numpy as np
    import PIL

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        grain_version = version("grain")
    except Exception:
        grain_version = getattr(grain, "__version__", "unknown")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "grain": grain_version,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def run_torchvision(python: str, spec: dict[str, Any], tmp: pathlib.Path) -> dict[str, Any]:
    """The torchvision cells of `spec`, measured by `python` (its own virtualenv): the spec goes in as JSON on
    stdin, the figures come back in a JSON file (stdout is left to torch's messages)."""
    out = tmp / "torchvision.json"
    cmd = [python, os.fspath(TORCHVISION_PY), os.fspath(out)]
    proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"the torchvision side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def format_table(result: dict[str, Any]) -> str:
    rows = [
        "| config | implementation | workers | images/s (median, best) | cores | images/s per core (median, best)"
        " | CPU ms/image | ours/torchvision per core | ours/torchvision images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        r_core, r_wall = c.get("ratio_per_core"), c.get("ratio_images_per_s")
        rows.append(
            f"| {c['size']} | {c['impl']} | {c['workers']} | {c['images_per_s']:.1f} ({c['images_per_s_best']:.1f})"
            f" | {c['cores']:.2f} | {c['images_per_core_s']:.1f} ({c['images_per_core_s_best']:.1f})"
            f" | {c['cpu_ms_per_image']:.1f} | {'—' if r_core is None else f'{r_core:.2f}x'}"
            f" | {'—' if r_wall is None else f'{r_wall:.2f}x'} |"
        )
    return "\n".join(rows)


def _cell_line(cell: dict[str, Any]) -> str:
    return (
        f"{cell['size']} {cell['impl']} workers={cell['workers']}: {cell['images_per_s']:.1f} images/s,"
        f" {cell['images_per_core_s']:.1f} images/s per core ({cell['cores']:.2f} cores; cell {cell['cell_s']:.0f} s)"
    )


def torchvision_spec(cfg: Any, options: Options, png_dir: pathlib.Path) -> dict[str, Any]:
    """What the torchvision side needs to run the same recipe as `cfg` on the same PNGs."""
    from chexfound_jax.data import batch_layout

    size = {
        "name": size_name(cfg),
        "global_size": cfg.crops.global_crops_size,
        "local_size": cfg.crops.local_crops_size,
        "n_local": cfg.crops.local_crops_number,
        "global_scale": list(cfg.crops.global_crops_scale),
        "local_scale": list(cfg.crops.local_crops_scale),
        "grid": cfg.crops.global_crops_size // cfg.model.patch_size,
        "mask_ratio": list(cfg.ibot.mask_ratio_min_max),
        "mask_probability": cfg.ibot.mask_sample_probability,
        "max_masked_tokens": batch_layout.max_masked_tokens(cfg, options.batch_size),
    }
    return {
        "png_dir": os.fspath(png_dir),
        "masking_py": os.fspath(MASKING_PY),
        "workers": list(options.workers),
        "images": options.images,
        "repeats": options.repeats,
        "batch": options.batch_size,
        "seed": options.seed,
        "sizes": [size],
    }


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """ours / torchvision (same config and workers), per core and per wall second; None without torchvision."""
    tv_cells = {(c["size"], c["workers"]): c for c in cells if c["impl"] == "torchvision"}
    for c in cells:
        if c["impl"] != "torchvision":
            tv = tv_cells.get((c["size"], c["workers"]))
            c["ratio_per_core"] = c["images_per_core_s"] / tv["images_per_core_s"] if tv else None
            c["ratio_images_per_s"] = c["images_per_s"] / tv["images_per_s"] if tv else None
    order = {impl: i for i, impl in enumerate(IMPLS)}
    cells.sort(key=lambda c: (-int(c["size"].split("/")[0]), c["workers"], order[c["impl"]]))


def _data(options: Options, tmp: pathlib.Path) -> dict[str, Any]:
    """The dataset (--dataset, or the bundled Kermany images built here) and its records exported as PNGs."""
    dataset = options.dataset
    if not dataset:
        t0 = time.perf_counter()
        dataset = os.fspath(build_kermany(tmp / "shards", options.prep_size))
        print(f"built the Kermany dataset (shorter side {options.prep_size}) in {time.perf_counter() - t0:.1f} s")
    return {"dataset": dataset, **export_pngs(dataset, options.split, tmp / "png", options.export_limit)}


def _ours_cells(base: Any, size: CropSizes, dataset: str, options: Options, result: dict[str, Any]) -> Any:
    """Our cells of one crop size into `result` (and jit(finish_on_device) on a batch); the device-mode config."""
    cfgs = {mode: bench_config(base, size, mode, options, dataset) for mode in ("device", "host")}
    for workers in options.workers:
        for mode, cfg in cfgs.items():
            keep: list | None = [] if mode == "device" and workers == 0 else None
            result["cells"].append(ours_cell(cfg, workers, options, keep))
            print(_cell_line(result["cells"][-1]))
            if keep:
                fod = time_finish_on_device(cfg, keep[0], options.device_repeats)
                result["finish_on_device"].append(fod)
                print(
                    f"{fod['size']} jit(finish_on_device) on {fod['device']}: {fod['ms_per_image']:.1f}"
                    f" ms/image (batch {fod['batch_s'] * 1e3:.0f} ms, compile {fod['compile_s']:.1f} s)"
                )
    return cfgs["device"]


def run(base: Any, options: Options) -> dict[str, Any]:
    """Every cell of `options` on the pretraining config `base`: figures per cell, finish_on_device, ratios."""
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults here)
        flags.FLAGS.mark_as_parsed()
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"machine": machine_info(), "cells": [], "finish_on_device": [], "torchvision": None}
    print(f"machine: {result['machine']}")
    tv_python = options.torchvision_python
    if not tv_python:
        result["torchvision"] = "skipped: no --torchvision_python"
    elif not os.access(tv_python, os.X_OK):
        result["torchvision"] = f"skipped: {tv_python} is not an executable"
        tv_python = None
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        result["data"] = _data(options, tmp)
        print(f"data: {result['data']}")
        for size in options.crop_sizes:
            cfg = _ours_cells(base, size, result["data"]["dataset"], options, result)
            if not tv_python:
                continue
            try:
                tv = run_torchvision(tv_python, torchvision_spec(cfg, options, tmp / "png"), tmp)
            except (RuntimeError, OSError) as e:
                print(f"torchvision side failed: {e}")
                result["torchvision"] = f"skipped: the torchvision side failed: {str(e).strip().splitlines()[-1]}"
                tv_python = None
                continue
            result["torchvision"] = tv["versions"]
            result["cells"].extend(tv["cells"])
            for cell in tv["cells"]:
                print(_cell_line(cell))
    add_ratios(result["cells"])
    result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


def print_report(result: dict[str, Any]) -> None:
    print()
    print(format_table(result))
    for fod in result["finish_on_device"]:
        print(
            f"jit(finish_on_device) {fod['size']} on {fod['device']}: {fod['ms_per_image']:.1f} ms per image"
            " (XLA:CPU; not representative of an accelerator)"
        )
    if isinstance(result["torchvision"], dict):
        print(f"torchvision side: {result['torchvision']}")
    else:
        print(f"torchvision comparison {result['torchvision']}")
    load = result["load_average"]
    print(f"1-minute load average: {load[0]:.2f} before, {load[1]:.2f} after")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    d = Options()
    fv = {"flag_values": flag_values}
    help_config = "Pretraining config file (default configs/pretrain/vitl16_512.py); --config.a.b=value overrides."
    config_flags.DEFINE_config_file("config", None, help_config, lock_config=True, **fv)
    flags.DEFINE_string("crop_sizes", "512/144,224/96", "GLOBAL/LOCAL crop sizes, comma-separated, or 'config'.", **fv)
    flags.DEFINE_integer("images", d.images, "Images per timed window.", lower_bound=1, **fv)
    flags.DEFINE_integer("repeats", d.repeats, "Timed windows per cell (median, best).", lower_bound=1, **fv)
    flags.DEFINE_list("workers", [str(w) for w in d.workers], "Worker counts (0: in the main process).", **fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Images per batch (official per-GPU at 512).", lower_bound=1, **fv)
    flags.DEFINE_integer("read_threads", d.read_threads, "grain threads per process (data.read_threads).", **fv)
    flags.DEFINE_integer("read_buffer", d.read_buffer, "grain prefetch buffer per process, in batches.", **fv)
    flags.DEFINE_string("dataset", None, "A built data_prep dataset (<workdir>/<name>/<version>).", **fv)
    flags.DEFINE_string("split", d.split, "Split of the dataset.", **fv)
    flags.DEFINE_integer("prep_size", d.prep_size, "Shorter side of the bundled Kermany build.", **fv)
    flags.DEFINE_integer("export_limit", d.export_limit, "Records written as PNGs for torchvision.", **fv)
    flags.DEFINE_string("torchvision_python", None, "Python of a virtualenv with torch + torchvision.", **fv)
    flags.DEFINE_integer("device_repeats", d.device_repeats, "Timed calls of jit(finish_on_device).", **fv)
    flags.DEFINE_string("out", None, "Also write the results to this JSON file.", **fv)
    flags.DEFINE_integer("seed", d.seed, "Sampler seed of the torchvision side.", **fv)
    for old, new in RENAMED.items():
        retired_flags.define_renamed(old, new, flag_values=flag_values)


def options_from_flags(fv: flags.FlagValues = flags.FLAGS) -> Options:
    try:
        return Options(
            crop_sizes=tuple(parse_crop_sizes(fv.crop_sizes)),
            images=fv.images,
            repeats=fv.repeats,
            workers=tuple(int(w) for w in fv.workers),
            batch_size=fv.batch_size,
            read_threads=fv.read_threads,
            read_buffer=fv.read_buffer,
            dataset=fv.dataset,
            split=fv.split,
            prep_size=fv.prep_size,
            export_limit=fv.export_limit,
            torchvision_python=fv.torchvision_python,
            device_repeats=fv.device_repeats,
            seed=fv.seed,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run(flags.FLAGS.config, options_from_flags())
    print_report(result)
    if flags.FLAGS.out:
        pathlib.Path(flags.FLAGS.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    define_flags()
    cli.run(main, default_config=DEFAULT_CONFIG)
