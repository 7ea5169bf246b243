r"""One-process GPU check of the pretraining recipe: fit, step MFU, backbone forward, on-device photometry.

    bash bench/gpu_check.sh [OUT.json]          # on a machine with one H100 / H200 (installs, then runs this)
    python -m bench.gpu_check --json=OUT.json   # the same, with the package importable
    python -m bench.gpu_check --smoke --json=OUT.json   # CPU, configs/pretrain/tiny_cpu.py: proves it runs

Sections, all in one JSON (rewritten after every section and every timed combination, so a run cut
short still leaves what it measured) and a short summary on stdout:

  environment      jax / jaxlib / Python versions, the device kind and count, the chip's public figures
                   (chexfound_jax.hardware), the allocator's byte limit.
  vit_forward      the paper backbone (ViT-L/16 reg4 SwiGLU at 512 px) forward in bf16, batch 32:
                   images/s and analytic TFLOP/s (chexfound_jax.models.flops), per attention implementation.
  finish_on_device jit(pipeline.finish_on_device) on a pipeline batch of 32 images (uint8 crops and
                   photometric parameters made by the pipeline's own per-example and grouping steps from
                   synthetic X-ray-sized images): ms per image. Where the pipeline module cannot be imported
                   (it needs grain, tensorflow_datasets, array_record), this file's copies of those steps run.
  compile_check    chexfound_jax.compile_check.check for the paper config (configs/pretrain/vitl16_512.py)
                   at per-device batches 64, 48, 32, 16 until one fits the chip's HBM; each report kept.
                   Also whether 32 per device fits 80 GB (the project's target). A report of a batch that
                   ran out of memory at compile has fits False and XLA's message under "error".
  train_step       the real step (teacher + student + AdamW + EMA) for attention x remat combinations
                   (cudnn:full, cudnn:dots, xla:dots, xla:full): compile time, median step time over timed
                   steps after warm-up, images/s, executed and nominal TFLOP/s (chexfound_jax.train.flops)
                   and MFU against chexfound_jax.hardware.peak_flops. The config's own remat policy runs at
                   the largest batch the compile check fitted; other policies start at 32 (--other_remat_batch:
                   their memory is unknown and each too-large try costs a compile). A combination whose
                   compiled buffers exceed the allocator's limit (or that runs out of memory) is retried at the
                   next smaller batch of the list, skipping those a linear memory estimate rules out.

Every section and every item in it has a "status": "ok", "error" (then "error" holds the exception)
or "skipped: <why>" (the time budget, or cuDNN attention off a GPU). Each section runs under a deadline
taken from --budget_s (whole-process seconds, default 510 s so that the install and start fit in 10
minutes on an H100); an item whose expected cost (the last compile time seen) no longer fits is skipped.

The allocator may take 92% of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set; jax's default is 75%),
and compiles go to a fresh persistent compilation cache, so the step the compile check compiled is not
compiled again when timed ("compile_cache_hit" says so).

Targets printed next to the figures (the project's issue): a step at >= 60% MFU of executed FLOPs at
>= 32 images per device on one H100, and 32 images per 80 GB H100 must fit.

--smoke runs every section on the CPU with the tiny config, tiny batches and one timed step (CI proves
the script end to end with it; tests/test_gpu_check.py); there the chip is unknown, so "fits" is None
and the first batch that compiles is taken. Nothing is asserted here: this is a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

_T0 = time.perf_counter()
# jax preallocates 75% of GPU memory by default; the step at the largest batch wants more of the 80 GB.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import monitoring  # noqa: E402

from bench import timing  # noqa: E402
from chexfound_jax import hardware  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3
TARGET_MFU_PCT = 60.0  # executed-FLOP MFU of the step on one H100 ...
TARGET_BATCH = 32  # ... at >= this many images per device, which must fit ...
TARGET_HBM_BYTES = 80e9  # ... in an 80 GB H100.
# cudnn:full first: the paper config's own step ("auto" attention is cuDNN on a GPU), which the compile check
# has just compiled, so the persistent cache serves it and it costs no compile.
DEFAULT_COMBOS = "cudnn:full,cudnn:dots,xla:dots,xla:full"
# Smoke: the CPU has no cuDNN (recorded as skipped), then xla with the tiny config's own remat: the step the
# compile check has just compiled, so the persistent cache serves it and the smoke run stays one step compile.
SMOKE_COMBOS = "cudnn:dots,xla:<the config's remat>"


# --- plumbing --------------------------------------------------------------------------------------


_CACHE_HITS = [0]


def _count_cache_hits(event: str, **kwargs: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


def error_text(e: BaseException) -> str:
    """`Type: first lines of the message`, short enough for a JSON report."""
    text = str(e).strip()
    lines = text.splitlines()
    text = "\n".join(lines[:8]) + ("\n..." if len(lines) > 8 else "")
    return f"{type(e).__name__}: {text[:1500]}"


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text or "ran out of memory" in text


def _failed(e: BaseException) -> dict[str, Any]:
    return {"status": "error", "error": error_text(e), "traceback": traceback.format_exc()[-3000:]}


def _gib(x: float | None) -> float | None:
    return None if x is None else round(x / GIB, 3)


class Check:
    """The JSON being built, the time budget, and the expected cost of the next compile."""

    def __init__(self, path: str | None, budget_s: float, est_compile_s: float):
        self.path = path
        self.end = _T0 + budget_s
        self.est_compile_s = est_compile_s  # updated with every step compile seen
        self.result: dict[str, Any] = {}

    def now(self) -> float:
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - _T0

    def save(self) -> None:
        if not self.path:
            return
        path = pathlib.Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(path)

    def section(
        self, name: str, fn: Callable[[float, dict[str, Any]], None], max_s: float, reserve_s: float = 0.0
    ) -> None:
        """fn(deadline, out) fills result[name] = out (saved as it goes); an exception becomes an error entry
        next to what was filled in, not an abort."""
        start = self.now()
        deadline = min(start + max_s, self.end - reserve_s)
        print(f"\n== {name} (t = {self.elapsed():.0f} s, {max(deadline - start, 0):.0f} s allowed)", flush=True)
        if deadline <= start:
            out: dict[str, Any] = {"status": "skipped: time budget"}
        else:
            out = {"status": "ok"}
            self.result[name] = out  # partial results land here as the section goes
            try:
                fn(deadline, out)
            except Exception as e:
                out.update(_failed(e))
                print(f"{name}: {out['error']}", flush=True)
        out["section_s"] = round(self.now() - start, 1)
        self.result[name] = out
        self.save()


# --- configs ---------------------------------------------------------------------------------------


def base_config(smoke: bool) -> Any:
    if smoke:
        from configs.pretrain import tiny_cpu

        return tiny_cpu.get_config()
    from configs.pretrain import vitl16_512

    return vitl16_512.get_config()


def allocator_limit(device: jax.Device) -> int | None:
    """Bytes the device's allocator may hand out (None on CPUs)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    return stats.get("bytes_limit")


# --- sections --------------------------------------------------------------------------------------


def environment(devices: list[jax.Device], args: argparse.Namespace) -> dict[str, Any]:
    import jaxlib

    d = devices[0]
    chip = hardware.chip_for_device_kind(d.device_kind)
    out: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "gpu",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "unknown"),
        "backend": jax.default_backend(),
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "devices_used": len(devices),
        "chip": dataclasses.asdict(chip) if chip else None,
        "peak_bf16_flops": hardware.peak_flops(d.device_kind),
        "allocator_bytes_limit": allocator_limit(d),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "env": {
            k: os.environ.get(k)
            for k in (
                "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_FLAGS",
                "CUDA_VISIBLE_DEVICES",
            )
        },
    }
    if d.platform == "gpu":
        try:
            out["environment_info"] = jax.print_environment_info(return_string=True)
        except Exception as e:
            out["environment_info"] = error_text(e)
    limit = out["allocator_bytes_limit"]
    print(
        f"jax {out['jax']} on {d.device_kind} ({d.platform}, {out['device_count']} visible, {len(devices)} used);"
        f" chip {chip.name if chip else None}; allocator limit {_gib(limit)} GiB",
        flush=True,
    )
    return out


def vit_forward(check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], args) -> None:
    """The config's backbone forward (forward_features) in bf16 at its global crop size, per attention impl."""
    from flax import nnx

    from chexfound_jax.models.build import init_random
    from chexfound_jax.models.flops import vit_forward_flops
    from chexfound_jax.train import recipe

    device = devices[0]
    batch, resolution = args.forward_batch, cfg.crops.global_crops_size
    impls = ["cudnn", "xla"] if device.platform == "gpu" else ["xla"]
    base = recipe.backbone_config(cfg).replace(dtype="bfloat16", drop_path_rate=0.0, remat=False)
    flops = vit_forward_flops(base, resolution)
    peak = hardware.peak_flops(device.device_kind)
    out.update(
        {
            "model": f"{cfg.model.arch}/{base.patch_size} reg{base.num_register_tokens} {base.ffn_layer}"
            f" (embed {base.embed_dim}, depth {base.depth})",
            "resolution": resolution,
            "batch": batch,
            "dtype": "bfloat16",
            "gflop_per_image": flops / 1e9,
            "runs": [],
        }
    )
    graphdef = params = None
    for impl in impls:
        if check.now() + 20 > deadline and out["runs"]:
            out["runs"].append({"attention_impl": impl, "status": "skipped: time budget"})
            continue
        run: dict[str, Any] = {"attention_impl": impl, "status": "ok"}
        try:
            vit_cfg = base.replace(attention_impl=impl)
            with jax.default_device(device):
                if params is None:
                    t0 = time.perf_counter()
                    graphdef, params = init_random(vit_cfg, 0)
                    out["init_s"] = round(time.perf_counter() - t0, 2)
                else:  # same parameters, another attention: only the graph's config differs
                    graphdef, _ = nnx.split(nnx.eval_shape(lambda c=vit_cfg: _vit(c)))
                x = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, 3), jax.numpy.float32)

            def forward(state, x, graphdef=graphdef):
                return nnx.merge(graphdef, state).forward_features(x)

            t0 = time.perf_counter()
            compiled = jax.jit(forward).lower(params, x).compile()
            run["compile_s"] = round(time.perf_counter() - t0, 2)
            times = timing.time_calls(compiled, (params, x), args.warmup, args.forward_iters)
            step = statistics.median(times)
            run.update(
                step_ms=step * 1e3,
                step_ms_min=min(times) * 1e3,
                iters=len(times),
                images_per_s=batch / step,
                tflops=flops * batch / step / 1e12,
            )
            if peak:
                run["mfu_pct"] = 100 * flops * batch / step / peak
            del compiled, x
        except Exception as e:
            run.update(_failed(e))
        out["runs"].append(run)
        check.save()
        print(f"forward {impl}: {_run_line(run)}", flush=True)
    del params
    gc.collect()


def _vit(cfg: Any) -> Any:
    from flax import nnx

    from chexfound_jax.models.vit import VisionTransformer

    return VisionTransformer(cfg, rngs=nnx.Rngs(0))


def _run_line(run: dict[str, Any]) -> str:
    if run.get("status") != "ok":
        return run.get("error") or run.get("status", "?")
    mfu = f", MFU {run['mfu_pct']:.1f}%" if "mfu_pct" in run else ""
    return (
        f"{run['step_ms']:.2f} ms per batch, {run['images_per_s']:.1f} images/s, {run['tflops']:.1f} TFLOP/s{mfu}"
        f" (compile {run['compile_s']:.1f} s)"
    )


PARAM_PREFIX = "aug_"  # chexfound_jax.data.pipeline.PARAM_PREFIX


def load_pipeline() -> tuple[Any, str | None]:
    """(chexfound_jax.data.pipeline, None), or (None, why) where it cannot be imported: it pulls in
    grain, tensorflow_datasets and array_record (for reading shards), which an accelerator image may lack."""
    try:
        from chexfound_jax.data import pipeline

        return pipeline, None
    except ImportError as e:
        return None, error_text(e)


def synthetic_xray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A uint8 gray image shaped like a prepared record (shorter side `size`, portrait)."""
    height = size + int(rng.integers(0, size // 4 + 1))
    ramp = np.linspace(40, 200, height, dtype=np.float32)[:, None]
    return np.clip(ramp + rng.normal(0, 25, (height, size)), 0, 255).astype(np.uint8)


def _example(element: dict, rng: np.random.Generator, aug: Any) -> dict:
    """pipeline._example with photometric="device", for when the pipeline module is not importable."""
    from chexfound_jax.data import augment

    crops = augment.multi_crop(element["image"], rng, aug)
    out = {"record": element["record"], "skipped": element["skipped"], "mask_seed": rng.integers(2**63)}
    for kind in ("global", "local"):
        out[f"{kind}_crops"] = crops[f"{kind}_crops"]
        out.update({f"{PARAM_PREFIX}{kind}_{k}": v for k, v in crops[f"{kind}_params"].items()})
    return out


def _group(examples: list[dict], cfg: Any) -> dict:
    """pipeline._group (crop-major crops and parameters, the group's iBOT masks), likewise."""
    from chexfound_jax.ssl import masking
    from chexfound_jax.train import recipe

    stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    crop_major = lambda x: np.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
    out = {k: crop_major(v) for k, v in stacked.items() if k not in ("record", "skipped", "mask_seed")}
    two_b = out["global_crops"].shape[0]
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    masks = masking.collate_masks(
        np.random.default_rng(stacked["mask_seed"].astype(np.uint64).tolist()),
        two_b,
        (grid, grid),
        mask_ratio=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        max_masked_tokens=recipe.max_masked_tokens(cfg, two_b // 2),
    )
    out |= {k: masks[k] for k in ("masks", "mask_indices", "mask_weights", "mask_valid")}
    out["skipped"] = np.int32(stacked["skipped"].sum())
    out["record_index"] = stacked["record"].astype(np.int64)
    return out


def _finish(batch: dict, cfg: Any) -> dict:
    """pipeline.finish_on_device for uint8 crops (the photometric ops under jit), likewise."""
    import jax.numpy as jnp

    from chexfound_jax.data import augment
    from chexfound_jax.train import recipe

    aug = augment.AugmentConfig.from_config(cfg)
    out = {k: batch[k] for k in recipe.BATCH_KEYS}
    for kind in ("global", "local"):
        prefix = f"{PARAM_PREFIX}{kind}_"
        params = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
        out[f"{kind}_crops"] = augment.photometric(batch[f"{kind}_crops"], params, aug, xp=jnp)
    return out


def pipeline_batch(
    cfg: Any, images: int, rng: np.random.Generator, pipeline: Any = None
) -> tuple[dict[str, np.ndarray], float]:
    """One group of `images` synthetic X-ray-sized images through the pipeline's per-example step (multi-crop
    geometry + photometric draws, photometric="device") and grouping step (crop-major layout, iBOT masks):
    the batch `finish_on_device` gets, with its group axis. `pipeline`: the module, or None for this file's
    copies of those two steps. Returns (batch, host seconds)."""
    from chexfound_jax.data import augment

    aug = augment.AugmentConfig.from_config(cfg)
    example = (
        (lambda e, r: pipeline._example(e, r, aug, on_host=False)) if pipeline else (lambda e, r: _example(e, r, aug))
    )
    group = pipeline._group if pipeline else _group
    t0 = time.perf_counter()
    examples = []
    for record in range(images):
        element = {"image": synthetic_xray(rng, cfg.crops.global_crops_size), "record": record, "skipped": 0}
        examples.append(example(element, rng))
    batch = {k: np.asarray(v)[None] for k, v in group(examples, cfg).items()}  # one group
    return batch, time.perf_counter() - t0


def finish_on_device(check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], args) -> None:
    from chexfound_jax.train import recipe

    pipeline, why = load_pipeline()
    out["via"] = "pipeline.finish_on_device" if pipeline else f"bench.gpu_check copies of the pipeline steps ({why})"
    finish = pipeline.finish_on_device if pipeline else _finish
    device = devices[0]
    images = args.fod_images
    batch, host_s = pipeline_batch(cfg, images, np.random.default_rng(0), pipeline)
    keys = [k for k in batch if k in recipe.BATCH_KEYS or k.startswith(PARAM_PREFIX)]
    arrays = jax.device_put({k: batch[k] for k in keys}, device)
    fn = jax.jit(lambda b: finish(b, cfg))
    t0 = time.perf_counter()
    compiled = fn.lower(arrays).compile()
    compile_s = time.perf_counter() - t0
    out_batch = jax.block_until_ready(compiled(arrays))
    times = []
    for _ in range(args.fod_repeats):
        if times and check.now() > deadline:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(arrays))
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out.update(
        {
            "images": images,
            "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "input_bytes": int(sum(np.asarray(batch[k]).nbytes for k in keys)),
            "output_shapes": {k: list(v.shape) for k, v in out_batch.items() if k.endswith("_crops")},
            "host_build_ms_per_image": 1e3 * host_s / images,
            "compile_s": round(compile_s, 2),
            "batch_ms": step * 1e3,
            "batch_ms_min": min(times) * 1e3,
            "repeats": len(times),
            "ms_per_image": 1e3 * step / images,
            "images_per_s": images / step,
        }
    )
    print(
        f"finish_on_device: {out['ms_per_image']:.3f} ms per image ({images} images,"
        f" {out['batch_ms']:.2f} ms per batch, compile {compile_s:.1f} s); host crops"
        f" {out['host_build_ms_per_image']:.1f} ms per image",
        flush=True,
    )


def _fit_verdict(reports: list[dict[str, Any]]) -> bool | None:
    """Does TARGET_BATCH per device fit TARGET_HBM_BYTES, from the reports (fit is monotone in the batch)?"""
    for r in reports:
        peak = (r.get("memory") or {}).get("peak")
        b = r.get("per_device_batch")
        if b is None:
            continue
        if peak is not None and b >= TARGET_BATCH and peak <= TARGET_HBM_BYTES:
            return True
        over = (peak is not None and peak > TARGET_HBM_BYTES) or (
            r.get("fits") is False and "memory" not in r and (r.get("hbm_bytes") or 0) <= TARGET_HBM_BYTES
        )
        if b <= TARGET_BATCH and over:
            return False
    return None


def compile_check_section(check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], args) -> None:
    from chexfound_jax import compile_check
    from chexfound_jax.parallel import topology as topology_lib

    topo = topology_lib.get_topology("local")
    topo = dataclasses.replace(topo, devices=tuple(devices))
    mesh_axes, rules = {"data": len(devices), "fsdp": 1}, "data_parallel"
    limit = allocator_limit(devices[0])
    out.update(
        {
            "config": args.config_name,
            "mesh": mesh_axes,
            "rules": rules,
            "attention_impl": str(cfg.model.attention_impl),
            "remat": str(cfg.model.remat),
            "batches": args.batches,
            "reports": [],
            "largest_fitting_batch": None,
        }
    )

    def run(b: int) -> dict[str, Any]:
        if check.now() + check.est_compile_s > deadline:
            return {"per_device_batch": b, "status": "skipped: time budget"}
        print(f"compile check at {b} per device ...", flush=True)
        try:
            report = compile_check.check(cfg, topo, b, mesh_axes, rules)
        except Exception as e:
            return {"per_device_batch": b, **_failed(e)}
        report["status"] = "ok"
        peak = (report.get("memory") or {}).get("peak")
        if peak is not None:
            check.est_compile_s = max(report.get("compile_s", 0.0), 1.0)
            report["peak_gib"] = _gib(peak)
            report["fits_80gb"] = bool(peak <= TARGET_HBM_BYTES)
            report["fits_allocator"] = bool(peak <= limit) if limit else None
        print(
            f"  batch {b}: peak {report.get('peak_gib')} GiB of {_gib(report.get('hbm_bytes'))} GiB HBM -> fits"
            f" {report.get('fits')} (allocator limit {_gib(limit)} GiB; compile {report.get('compile_s')} s)",
            flush=True,
        )
        return report

    def usable(r: dict[str, Any]) -> bool:
        if r.get("status") != "ok" or "memory" not in r:
            return False
        if r.get("fits") is not None:
            return bool(r["fits"])
        return r.get("fits_allocator") is not False  # no chip figures (CPU, unknown GPU): what compiles

    for b in args.batches:
        report = run(b)
        out["reports"].append(report)
        check.save()
        if usable(report):
            out["largest_fitting_batch"] = b
            break
    # The target's own batch, where the reports so far do not settle whether it fits 80 GB.
    checked = {r.get("per_device_batch") for r in out["reports"] if r.get("status") == "ok"}
    if not args.smoke and _fit_verdict(out["reports"]) is None and TARGET_BATCH not in checked:
        out["reports"].append(run(TARGET_BATCH))
    out["fits_32_per_80gb"] = _fit_verdict(out["reports"])


def _time_step(training: Any, compiled: Any, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Allocates the state and two batches, runs warm-up and timed steps; everything is freed on return."""
    from chexfound_jax.data.collate import synthetic_batch

    t0 = time.perf_counter()
    state = training.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    batches = [
        jax.device_put(synthetic_batch(cfg, training.batch_spec, rng), training.batch_shardings) for _ in range(2)
    ]
    try:
        state, metrics, times = timing.time_steps(compiled, state, batches, args.warmup, args.steps)
        loss = float(metrics["total_loss"])
    finally:
        del state, batches
    return {"init_s": round(init_s, 2), "times": times, "loss": loss}


def time_combo(
    check: Check,
    deadline: float,
    base: Any,
    impl: str,
    remat: str,
    candidates: list[int],
    devices: list[jax.Device],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The step of `base` with this attention and remat at the first of `candidates` that fits."""
    from chexfound_jax import compile_check
    from chexfound_jax.train import flops as flops_lib
    from chexfound_jax.train.setup import build_training

    n = len(devices)
    device = devices[0]
    limit = allocator_limit(device)
    peak_flops = hardware.peak_flops(device.device_kind)
    run: dict[str, Any] = {"attention_impl": impl, "remat": remat, "attempts": []}
    todo = list(candidates)
    while todo:
        b = todo.pop(0)
        if check.now() + check.est_compile_s + 10 > deadline:
            run["attempts"].append({"per_device_batch": b, "status": "skipped: time budget"})
            break
        cfg = compile_check.job_config(base, b, n)
        cfg.model.attention_impl = impl
        cfg.model.remat = remat
        print(f"step {impl}/{remat} at {b} per device: compiling ...", flush=True)
        training = build_training(cfg, {"data": n, "fsdp": 1}, "data_parallel", devices)
        hits = _CACHE_HITS[0]
        try:
            compiled, compile_s = compile_check.compile_abstract(training)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            run["attempts"].append(
                {"per_device_batch": b, "status": "out of memory at compile", "error": error_text(e)}
            )
            continue
        cache_hit = _CACHE_HITS[0] > hits  # served by the persistent cache: compile_s is not a compile
        if not cache_hit:
            check.est_compile_s = max(compile_s, 1.0)
        memory = compile_check.memory_figures(compiled)
        attempt = {
            "per_device_batch": b,
            "compile_s": round(compile_s, 2),
            "compile_cache_hit": cache_hit,
            "peak_gib": _gib(memory["peak"]),
        }
        if limit and memory["peak"] > limit:
            # The batch part of the buffers scales with the batch: skip candidates that cannot fit either.
            fixed = memory["argument"]
            per_image = max(memory["peak"] - fixed, 0) / b
            todo = [c for c in todo if fixed + per_image * c <= limit] or todo[-1:]
            run["attempts"].append({**attempt, "status": f"does not fit the allocator's {_gib(limit)} GiB"})
            print(f"  peak {attempt['peak_gib']} GiB > allocator {_gib(limit)} GiB: smaller batch", flush=True)
            del compiled, training
            gc.collect()
            continue
        try:
            timed = _time_step(training, compiled, cfg, args)
        except Exception as e:
            del compiled, training
            gc.collect()
            if not is_out_of_memory(e):
                raise
            run["attempts"].append({**attempt, "status": "out of memory at run time", "error": error_text(e)})
            continue
        del compiled
        group = cfg.train.global_batch_size // cfg.train.batch_groups
        analytic = flops_lib.train_flops_per_image(cfg, group_size=group)
        del training
        gc.collect()
        times = timed["times"]
        step = statistics.median(times)
        images_per_s = cfg.train.global_batch_size / step
        executed = analytic["executed_total"] * images_per_s / n
        nominal = analytic["total"] * images_per_s / n
        run["attempts"].append({**attempt, "status": "ok"})
        run.update(
            status="ok",
            per_device_batch=b,
            global_batch=cfg.train.global_batch_size,
            compile_s=round(compile_s, 2),
            compile_cache_hit=cache_hit,
            init_s=timed["init_s"],
            memory=memory,
            peak_gib=_gib(memory["peak"]),
            warmup_steps=args.warmup,
            timed_steps=len(times),
            step_ms=step * 1e3,
            step_ms_min=min(times) * 1e3,
            step_ms_max=max(times) * 1e3,
            step_ms_all=[t * 1e3 for t in times],
            loss=timed["loss"],
            images_per_s=images_per_s,
            images_per_s_per_device=images_per_s / n,
            gflop_per_image_executed=analytic["executed_total"] / 1e9,
            gflop_per_image_nominal=analytic["total"] / 1e9,
            tflops_executed=executed / 1e12,
            tflops_nominal=nominal / 1e12,
        )
        if peak_flops:
            run["mfu_executed_pct"] = 100 * executed / peak_flops
            run["mfu_nominal_pct"] = 100 * nominal / peak_flops
            run["meets_target"] = bool(run["mfu_executed_pct"] >= TARGET_MFU_PCT and b >= TARGET_BATCH)
        try:
            run["device_peak_bytes_in_use"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
        except Exception:
            pass
        return run
    if any(a["status"] == "skipped: time budget" for a in run["attempts"]):
        run["status"] = "skipped: time budget"
    else:
        run["status"] = "skipped: no candidate batch fits" if run["attempts"] else "skipped: no candidate batch"
    return run


def train_step_section(check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], args) -> None:
    from chexfound_jax.models.vit import remat_policy_name

    fitting = (check.result.get("compile_check") or {}).get("largest_fitting_batch")
    start = fitting or (TARGET_BATCH if not args.smoke else args.batches[-1])
    candidates = [b for b in args.batches if b <= start] or [start]
    own_remat = remat_policy_name(cfg.model.remat)
    # The config's own policy starts at the largest batch the compile check found to fit. The others' memory is
    # unknown and every try too large costs a whole compile: they start at --other_remat_batch (the target's 32)
    # and step down where it does not fit.
    other_start = min(start, args.other_remat_batch) if args.other_remat_batch > 0 else start
    out.update(
        {
            "config": args.config_name,
            "config_remat": own_remat,
            "start_batch": start,
            "other_remat_start_batch": other_start,
            "start_batch_from": "compile_check" if fitting else "default (no fitting batch from the compile check)",
            "candidates": candidates,
            "mesh": {"data": len(devices), "fsdp": 1},
            "rules": "data_parallel",
            "runs": [],
        }
    )
    platform_name = devices[0].platform
    fits_for: dict[str, int] = {}  # remat policy -> the batch that fitted last: the next run starts there
    for impl, remat in args.combos:
        if impl == "cudnn" and platform_name != "gpu":
            run: dict[str, Any] = {
                "attention_impl": impl,
                "remat": remat,
                "status": f"skipped: cuDNN attention needs a GPU (platform {platform_name})",
            }
        elif check.now() + check.est_compile_s + 10 > deadline:
            run = {"attention_impl": impl, "remat": remat, "status": "skipped: time budget"}
        else:
            first = fits_for.get(remat, start if remat == own_remat else other_start)
            try:
                run = time_combo(
                    check, deadline, cfg, impl, remat, [b for b in candidates if b <= first], devices, args
                )
            except Exception as e:
                run = {"attention_impl": impl, "remat": remat, **_failed(e)}
                gc.collect()
            if run.get("status") == "ok":
                fits_for[remat] = run["per_device_batch"]
        out["runs"].append(run)
        check.save()
        line = _step_line(run) if run.get("status") == "ok" else run.get("error") or run["status"]
        print(f"step {impl}/{remat}: {line}", flush=True)


def _step_line(r: dict[str, Any]) -> str:
    mfu = ""
    if "mfu_executed_pct" in r:
        mfu = f", MFU executed {r['mfu_executed_pct']:.1f}% (nominal {r['mfu_nominal_pct']:.1f}%)"
    return (
        f"batch {r['per_device_batch']}: {r['step_ms']:.1f} ms/step, {r['images_per_s_per_device']:.1f} images/s per"
        f" device, {r['tflops_executed']:.1f} TFLOP/s executed{mfu}; peak {r['peak_gib']} GiB, compile"
        f" {r['compile_s']:.0f} s{' (persistent cache hit)' if r.get('compile_cache_hit') else ''}"
    )


# --- summary ---------------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    cc = result.get("compile_check") or {}
    runs = [r for r in (result.get("train_step") or {}).get("runs", []) if r.get("status") == "ok"]
    with_mfu = [r for r in runs if "mfu_executed_pct" in r]
    best = max(with_mfu, key=lambda r: r["mfu_executed_pct"]) if with_mfu else None
    at_target = [r for r in with_mfu if r["per_device_batch"] >= TARGET_BATCH]
    met = None
    if at_target:
        met = max(r["mfu_executed_pct"] for r in at_target) >= TARGET_MFU_PCT
    elif cc.get("fits_32_per_80gb") is False:
        met = False  # the target's batch does not fit at all
    return {
        "mfu_executed_target_pct": TARGET_MFU_PCT,
        "min_batch_per_device": TARGET_BATCH,
        "hbm_bytes": TARGET_HBM_BYTES,
        "fits_32_per_80gb": cc.get("fits_32_per_80gb"),
        "largest_fitting_batch": cc.get("largest_fitting_batch"),
        "best_mfu_executed_pct": best["mfu_executed_pct"] if best else None,
        "best_combo": f"{best['attention_impl']}/{best['remat']} at {best['per_device_batch']}" if best else None,
        "mfu_target_met": met,
    }


def _mark(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def summary(result: dict[str, Any]) -> list[str]:
    env, v = result.get("environment") or {}, result.get("targets") or {}
    lines = [
        f"gpu_check ({env.get('mode')}): jax {env.get('jax')} on {env.get('device_kind')} x{env.get('devices_used')},"
        f" total {result.get('total_s', 0):.0f} s",
    ]
    cc = result.get("compile_check") or {}
    if cc.get("status") == "ok":
        for r in cc.get("reports", []):
            if r.get("status") == "ok" and "memory" in r:
                lines.append(
                    f"  fit {r['per_device_batch']:>3}/device: peak {r['peak_gib']:.1f} GiB of"
                    f" {_gib(r.get('hbm_bytes'))} GiB HBM -> fits {r.get('fits')} (80 GB: {r.get('fits_80gb')})"
                )
            else:
                lines.append(f"  fit {r.get('per_device_batch')}/device: {r.get('error') or r.get('status')}")
    else:
        lines.append(f"  compile check: {cc.get('error') or cc.get('status')}")
    lines.append(f"  target: {TARGET_BATCH} per 80 GB H100 must fit -> {_mark(v.get('fits_32_per_80gb'))}")
    ts = result.get("train_step") or {}
    for r in ts.get("runs", []):
        head = f"  step {r['attention_impl']:>5}/{r['remat']:<4}"
        lines.append(f"{head}: " + (_step_line(r) if r.get("status") == "ok" else (r.get("error") or r["status"])))
    if ts.get("status") not in (None, "ok"):
        lines.append(f"  train step: {ts.get('error') or ts.get('status')}")
    best = v.get("best_mfu_executed_pct")
    best = f"best {best:.1f}% ({v.get('best_combo')})" if best is not None else "no MFU measured"
    lines.append(
        f"  target: step >= {TARGET_MFU_PCT:.0f}% MFU (executed) at >= {TARGET_BATCH} images on one H100: {best}"
        f" -> {_mark(v.get('mfu_target_met'))}"
    )
    fw = result.get("vit_forward") or {}
    for r in fw.get("runs", []):
        lines.append(
            f"  forward {fw.get('model')} {fw.get('resolution')} px bf16 x{fw.get('batch')}"
            f" {r['attention_impl']}: {_run_line(r)}"
        )
    if fw.get("status") not in (None, "ok"):
        lines.append(f"  forward: {fw.get('error') or fw.get('status')}")
    fod = result.get("finish_on_device") or {}
    if fod.get("status") == "ok":
        lines.append(
            f"  finish_on_device {fod['crops']}: {fod['ms_per_image']:.3f} ms per image ({fod['images']} images,"
            f" compile {fod['compile_s']:.1f} s)"
        )
    else:
        lines.append(f"  finish_on_device: {fod.get('error') or fod.get('status')}")
    return lines


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="gpu_check.json", help="Write every figure here (rewritten as sections finish).")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config, tiny batches, one timed step.")
    p.add_argument("--budget_s", type=float, default=None, help="Whole-process seconds (default 510; smoke 300).")
    p.add_argument("--batches", default=None, help="Per-device batches to try, largest first (default 64,48,32,16).")
    p.add_argument(
        "--combos",
        default=None,
        help=f"attention:remat pairs to time, in order (default {DEFAULT_COMBOS}; smoke {SMOKE_COMBOS}).",
    )
    p.add_argument("--steps", type=int, default=None, help="Timed steps (default 5; smoke 1).")
    p.add_argument("--warmup", type=int, default=None, help="Warm-up steps / forwards (default 2; smoke 1).")
    p.add_argument(
        "--other_remat_batch",
        type=int,
        default=TARGET_BATCH,
        help="Per-device batch that remat policies other than the config's start at (then smaller ones where it\n"
        "does not fit; the config's own policy starts at the largest batch the compile check fitted). 0: that\n"
        "largest batch for all.",
    )
    p.add_argument("--num_devices", type=int, default=1, help="Devices to use (0: all local ones).")
    p.add_argument("--no_compile_cache", action="store_true", help="No persistent compilation cache (GPU mode).")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.budget_s = args.budget_s or (300.0 if smoke else 510.0)
    args.batches = [int(b) for b in (args.batches or ("4,2" if smoke else "64,48,32,16")).split(",")]
    args.batches = sorted(set(args.batches), reverse=True)
    if args.combos or not smoke:
        args.combos = [tuple(c.strip().split(":")) for c in (args.combos or DEFAULT_COMBOS).split(",") if c.strip()]
        for c in args.combos:
            if len(c) != 2 or c[0] not in ("xla", "cudnn") or c[1] not in ("none", "full", "dots", "offload"):
                p.error(f"--combos wants attention:remat pairs (xla|cudnn : none|full|dots|offload), got {c}")
    args.steps = args.steps if args.steps is not None else (1 if smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.forward_batch = 2 if smoke else 32
    args.forward_iters = 1 if smoke else 10
    args.fod_images = 2 if smoke else 32
    args.fod_repeats = 1 if smoke else 10
    args.config_name = "configs/pretrain/tiny_cpu.py" if smoke else "configs/pretrain/vitl16_512.py"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():  # library code may read absl flags (their defaults here)
        flags.FLAGS.mark_as_parsed()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/ is not an installed package
    if args.smoke:
        # LLVM at -O0 (same buffers, a faster CPU compile), set before the CPU backend starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if not args.no_compile_cache and not jax.config.jax_compilation_cache_dir:
        # A fresh persistent cache: the step the compile check builds (the config's own attention and
        # remat) is then not compiled a second time when the same step is timed.
        cache_dir = tempfile.mkdtemp(prefix="gpu_check_cache_")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    monitoring.register_event_listener(_count_cache_hits)
    devices = jax.devices()
    if args.smoke:
        devices = jax.devices("cpu")
    devices = devices[: args.num_devices] if args.num_devices > 0 else devices

    check = Check(args.json, args.budget_s, est_compile_s=5.0 if args.smoke else 60.0)
    check.result = {"mode": "smoke" if args.smoke else "gpu", "config": args.config_name, "args": vars(args).copy()}
    check.result["args"]["combos"] = [":".join(c) for c in args.combos or ()]
    check.section("environment", lambda d, out: out.update(environment(devices, args)), max_s=60)
    cfg = None
    try:
        cfg = base_config(args.smoke)
    except Exception as e:
        check.result["config_error"] = _failed(e)
        for name in ("vit_forward", "finish_on_device", "compile_check", "train_step"):
            check.result[name] = {"status": "error", "error": f"no config: {check.result['config_error']['error']}"}
    if cfg is not None and args.combos is None:  # smoke: see SMOKE_COMBOS
        from chexfound_jax.models.vit import remat_policy_name

        args.combos = [("cudnn", "dots"), ("xla", remat_policy_name(cfg.model.remat))]
        check.result["args"]["combos"] = [":".join(c) for c in args.combos]
    if cfg is not None:
        train_reserve = 0.0 if args.smoke else 240.0  # what the compile check leaves to the timed steps
        check.section(
            "vit_forward",
            lambda d, out: vit_forward(check, d, out, cfg, devices, args),
            max_s=75,
            reserve_s=train_reserve + 150,
        )
        check.section(
            "finish_on_device",
            lambda d, out: finish_on_device(check, d, out, cfg, devices, args),
            max_s=45,
            reserve_s=train_reserve + 120,
        )
        check.section(
            "compile_check",
            lambda d, out: compile_check_section(check, d, out, cfg, devices, args),
            max_s=240,
            reserve_s=train_reserve,
        )
        check.section(
            "train_step", lambda d, out: train_step_section(check, d, out, cfg, devices, args), max_s=args.budget_s
        )
    check.result["targets"] = verdicts(check.result)
    check.result["total_s"] = round(check.elapsed(), 1)
    lines = summary(check.result)
    check.result["summary"] = lines
    check.save()
    print("\n" + "\n".join(lines), flush=True)
    if args.json:
        print(f"figures: {args.json}", flush=True)
    return check.result


if __name__ == "__main__":
    main()
