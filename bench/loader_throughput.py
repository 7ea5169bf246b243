"""Input pipeline throughput: our grain pipeline against the official torchvision DataAugmentationDINO.

Both sides produce the same thing from the same pixels: per image 2 global crops + N local crops of the
DINOv2 multi-crop augmentation (official data/augmentations.py), collated into batches of --batch images
(crop-major, as the official collate) with the iBOT masks of the official collate.

- ours-device: `pipeline.training_dataset` with `data.photometric="device"`. The host decodes the record,
  cuts and resizes the crops, draws the photometric parameters and the masks; jitter, blur, solarize and
  normalisation run later in `pipeline.finish_on_device` on the accelerator (timed separately here, on the
  CPU, which says little about an accelerator).
- ours-host: the same with `data.photometric="host"`: everything on the host, float32 RGB crops out.
- torchvision: the official recipe in bench/loader_torchvision.py, run by another interpreter
  (--torchvision_python, a virtualenv with torch and torchvision; that file imports only torch, torchvision,
  numpy, PIL, the standard library and this file's standard-library helpers). A map-style dataset reads a
  PNG file, decodes it with `Image.open(...).convert("RGB")` and applies `DataAugmentationDINO`
  (dinov2/data/augmentations.py: RandomResizedCrop bicubic + flip,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur(9, sigma 0.1-2) through the
  official wrapper that applies 1 - p, Solarize(128) p 0.2 on global crop 2, ToTensor, Normalize), in a
  torch DataLoader with an infinite shuffling sampler and the official `collate_data_and_cast` (stack
  crop-major, masks, cast to float16). The masks of both sides come from `chexfound_jax.ssl.masking.
  collate_masks` (loaded from its file: it needs only numpy), so the comparison is about the image work.

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
    python -m bench.loader_throughput --sizes=224/96 --workers=0 --images=40 --repeats=5 --json=out.json

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "vitl16_512.py"
KERMANY = REPO / "tests" / "data" / "kermany"
MASKING_PY = REPO / "chexfound_jax" / "ssl" / "masking.py"
TORCHVISION_PY = REPO / "bench" / "loader_torchvision.py"  # the torchvision side
IMPLS = ("ours-device", "ours-host", "torchvision")

# ---------------------------------------------------------------------------------------------------
# Shared by both interpreters: standard library only.
# ---------------------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, user + system CPU seconds)} of every process /proc shows."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return table


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """CPU seconds so far of `root` (default: this process) and each living descendant, by pid."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out[pid] = table[pid][1]
            todo.extend(children.get(pid, ()))
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree used between two `tree_cpu` snapshots (processes born in between count in full)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def measure(iterator: Any, *, batch: int, warmup: int, window_batches: int, windows: int) -> list[dict[str, float]]:
    """Consume `warmup` batches, then time `windows` consecutive windows of `window_batches` batches each."""
    for _ in range(warmup):
        next(iterator)
    out = []
    for _ in range(windows):
        cpu0, t0 = tree_cpu(), time.perf_counter()
        for _ in range(window_batches):
            next(iterator)
        t1, cpu1 = time.perf_counter(), tree_cpu()
        wall, cpu = t1 - t0, cpu_between(cpu0, cpu1)
        main_cpu = cpu1[os.getpid()] - cpu0[os.getpid()]
        images = window_batches * batch
        out.append(
            {"images": images, "wall_s": wall, "cpu_s": cpu, "main_cpu_s": main_cpu, "images_per_s": images / wall}
        )
        out[-1]["images_per_core_s"] = images / cpu if cpu > 0 else float("nan")
        out[-1]["cores"] = cpu / wall
    return out


def summarize(windows: list[dict[str, float]]) -> dict[str, Any]:
    """Median and best of the per-window figures."""
    out: dict[str, Any] = {"windows": windows}
    for key in ("images_per_s", "images_per_core_s", "cores"):
        values = [w[key] for w in windows]
        out[key] = statistics.median(values)
        if key != "cores":
            out[f"{key}_best"] = max(values)
    out["cpu_ms_per_image"] = 1e3 / out["images_per_core_s"]
    out["main_cpu_share"] = sum(w["main_cpu_s"] for w in windows) / max(sum(w["cpu_s"] for w in windows), 1e-9)
    return out


def plan(images: int, batch: int, workers: int) -> tuple[int, int]:
    """(warm-up batches, batches per window): windows hold whole rounds over the workers."""
    rounds = max(1, workers)
    window = -(-max(images, batch) // batch)
    window = -(-window // rounds) * rounds
    return max(1, 2 * workers), window


# ---------------------------------------------------------------------------------------------------
# Our side (the dev virtualenv).
# ---------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> Any:
    spec = importlib.util.spec_from_file_location("_bench_config", os.fspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_sizes(text: str) -> list[tuple[int, int] | None]:
    """'512/144,224/96' -> [(512, 144), (224, 96)]; 'config' -> [None] (the config's own crop sizes)."""
    out: list[tuple[int, int] | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "config":
            out.append(None)
            continue
        g, sep, s = item.partition("/")
        if not sep or not g.isdigit() or not s.isdigit() or int(g) < 1 or int(s) < 1:
            raise ValueError(f"--sizes wants comma-separated GLOBAL/LOCAL pixel sizes or 'config', got {text!r}")
        out.append((int(g), int(s)))
    return out


def bench_config(base: Any, size: tuple[int, int] | None, photometric: str, args: argparse.Namespace, dataset: str):
    """The config of one cell: crop sizes, photometric mode, one group of --batch images per batch."""
    cfg = base.copy_and_resolve_references()
    if size is not None:
        cfg.crops.global_crops_size, cfg.crops.local_crops_size = size
    cfg.data.update(
        datasets=(dataset,), photometric=photometric, read_threads=args.read_threads, read_buffer=args.read_buffer
    )
    cfg.train.update(global_batch_size=args.batch, batch_groups=1)
    return cfg


def size_name(cfg: Any) -> str:
    return f"{cfg.crops.global_crops_size}/{cfg.crops.local_crops_size}"


def build_kermany(out: pathlib.Path, prep_size: int) -> pathlib.Path:
    """The bundled Kermany X-rays as a data_prep dataset, shorter side `prep_size`."""
    from data_prep import local_runner, writers
    from data_prep import pipeline as prep
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


def ours_cell(cfg: Any, workers: int, args: argparse.Namespace, keep: list | None = None) -> dict[str, Any]:
    from chexfound_jax.data import pipeline

    t0 = time.perf_counter()
    layout = pipeline.train_layout(cfg, num_batch_shards=1, process_count=1)
    it = iter(pipeline.training_dataset(cfg, layout, process_index=0, num_workers=workers))
    warmup, window = plan(args.images, args.batch, workers)
    if keep is not None:
        keep.append(next(it))
        warmup = max(0, warmup - 1)
    windows = measure(it, batch=args.batch, warmup=warmup, window_batches=window, windows=args.repeats)
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
    out = tmp / "torchvision.json"
    cmd = [python, os.fspath(TORCHVISION_PY), "--torchvision_child", json.dumps(spec), os.fspath(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.fspath(DEFAULT_CONFIG), help="pretraining config file (get_config())")
    p.add_argument("--sizes", default="512/144,224/96", help="GLOBAL/LOCAL crop sizes, comma-separated, or 'config'")
    p.add_argument("--images", type=int, default=30, help="images per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per cell (median and best reported)")
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts (0: in the main process)")
    p.add_argument("--batch", type=int, default=10, help="images per batch (the official per-GPU batch at 512)")
    p.add_argument("--read_threads", type=int, default=1, help="grain threads per process (data.read_threads)")
    p.add_argument("--read_buffer", type=int, default=2, help="grain prefetch buffer per process, in batches")
    p.add_argument("--dataset", default=None, help="a built data_prep dataset (<output>/<name>/<version>)")
    p.add_argument("--split", default="train")
    p.add_argument("--prep_size", type=int, default=512, help="shorter side of the bundled Kermany build")
    p.add_argument("--export_limit", type=int, default=1024, help="records written as PNGs for torchvision")
    p.add_argument("--torchvision_python", default=None, help="python of a virtualenv with torch + torchvision")
    p.add_argument("--device_repeats", type=int, default=3, help="timed calls of jit(finish_on_device)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.size_list = parse_sizes(args.sizes)
    args.worker_list = [int(w) for w in args.workers.split(",")]
    if args.images < 1 or args.repeats < 1 or args.batch < 1 or min(args.worker_list) < 0:
        p.error("--images, --repeats and --batch must be positive and --workers non-negative")
    return args


def _cell_line(cell: dict[str, Any]) -> str:
    return (
        f"{cell['size']} {cell['impl']} workers={cell['workers']}: {cell['images_per_s']:.1f} images/s,"
        f" {cell['images_per_core_s']:.1f} images/s per core ({cell['cores']:.2f} cores; cell {cell['cell_s']:.0f} s)"
    )


def torchvision_spec(cfg: Any, args: argparse.Namespace, png_dir: pathlib.Path) -> dict[str, Any]:
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
        "max_masked_tokens": batch_layout.max_masked_tokens(cfg, args.batch),
    }
    return {
        "png_dir": os.fspath(png_dir),
        "masking_py": os.fspath(MASKING_PY),
        "workers": args.worker_list,
        "images": args.images,
        "repeats": args.repeats,
        "batch": args.batch,
        "seed": args.seed,
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults here)
        flags.FLAGS.mark_as_parsed()

    base = load_config(args.config)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"machine": machine_info(), "cells": [], "finish_on_device": [], "torchvision": None}
    print(f"machine: {result['machine']}")
    tv_python = args.torchvision_python
    if not tv_python:
        result["torchvision"] = "skipped: no --torchvision_python"
    elif not os.access(tv_python, os.X_OK):
        result["torchvision"] = f"skipped: {tv_python} is not an executable"
        tv_python = None
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if args.dataset:
            dataset = args.dataset
        else:
            t0 = time.perf_counter()
            dataset = os.fspath(build_kermany(tmp / "shards", args.prep_size))
            print(f"built the Kermany dataset (shorter side {args.prep_size}) in {time.perf_counter() - t0:.1f} s")
        result["data"] = {"dataset": dataset, **export_pngs(dataset, args.split, tmp / "png", args.export_limit)}
        print(f"data: {result['data']}")
        for size in args.size_list:
            cfgs = {mode: bench_config(base, size, mode, args, dataset) for mode in ("device", "host")}
            for workers in args.worker_list:
                for mode, cfg in cfgs.items():
                    keep: list | None = [] if mode == "device" and workers == 0 else None
                    result["cells"].append(ours_cell(cfg, workers, args, keep))
                    print(_cell_line(result["cells"][-1]))
                    if keep:
                        fod = time_finish_on_device(cfg, keep[0], args.device_repeats)
                        result["finish_on_device"].append(fod)
                        print(
                            f"{fod['size']} jit(finish_on_device) on {fod['device']}: {fod['ms_per_image']:.1f}"
                            f" ms/image (batch {fod['batch_s'] * 1e3:.0f} ms, compile {fod['compile_s']:.1f} s)"
                        )
            if tv_python:
                try:
                    tv = run_torchvision(tv_python, torchvision_spec(cfgs["device"], args, tmp / "png"), tmp)
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
    print(f"1-minute load average: {load_before:.2f} before, {result['load_average'][1]:.2f} after")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
