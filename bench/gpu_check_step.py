"""The compile_check and train_step sections of bench.gpu_check: the fit of the paper config per batch and the timed
training step per attention and remat, with the allocator limit and the compilation cache hits they depend on."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from bench import timing
from bench.gpu_check_report import (
    TARGET_BATCH,
    TARGET_HBM_BYTES,
    TARGET_MFU_PCT,
    _failed,
    _fit_verdict,
    _gib,
    _step_line,
    error_text,
)
from chexfound_jax import hardware

if TYPE_CHECKING:
    from bench.gpu_check import Check, Options


_CACHE_HITS = [0]


def _count_cache_hits(event: str, **kwargs: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text or "ran out of memory" in text


def allocator_limit(device: jax.Device) -> int | None:
    """Bytes the device's allocator may hand out (None on CPUs)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    return stats.get("bytes_limit")


def compile_check_section(
    check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], options: Options
) -> None:
    from chexfound_jax import compile_check
    from chexfound_jax.parallel import topology as topology_lib

    topo = topology_lib.get_topology("local")
    topo = dataclasses.replace(topo, devices=tuple(devices))
    mesh_axes, rules = {"data": len(devices), "fsdp": 1}, "data_parallel"
    limit = allocator_limit(devices[0])
    out.update(
        {
            "config": options.config_name,
            "mesh": mesh_axes,
            "rules": rules,
            "attention_impl": str(cfg.model.attention_impl),
            "remat": str(cfg.model.remat),
            "batches": options.per_device_batches,
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

    for b in options.per_device_batches:
        report = run(b)
        out["reports"].append(report)
        check.save()
        if usable(report):
            out["largest_fitting_batch"] = b
            break
    # The target's own batch, where the reports so far do not settle whether it fits 80 GB.
    checked = {r.get("per_device_batch") for r in out["reports"] if r.get("status") == "ok"}
    if not options.smoke and _fit_verdict(out["reports"]) is None and TARGET_BATCH not in checked:
        out["reports"].append(run(TARGET_BATCH))
    out["fits_32_per_80gb"] = _fit_verdict(out["reports"])


def _time_step(training: Any, compiled: Any, cfg: Any, options: Options) -> dict[str, Any]:
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
        state, metrics, times = timing.time_steps(compiled, state, batches, options.warmup, options.steps)
        loss = float(metrics["total_loss"])
    finally:
        del state, batches
    return {"init_s": round(init_s, 2), "times": times, "loss": loss}


def step_figures(cfg: Any, timed: dict[str, Any], n: int, peak_flops: float | None) -> dict[str, Any]:
    """Throughput, FLOP/s and MFU (executed and nominal counts) of the timed steps on n devices."""
    from chexfound_jax.train import flops as flops_lib

    group = cfg.train.global_batch_size // cfg.train.batch_groups
    analytic = flops_lib.train_flops_per_image(cfg, group_size=group)
    times = timed["times"]
    step = statistics.median(times)
    images_per_s = cfg.train.global_batch_size / step
    executed = analytic["executed_total"] * images_per_s / n
    nominal = analytic["total"] * images_per_s / n
    out = dict(
        global_batch=cfg.train.global_batch_size,
        init_s=timed["init_s"],
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
        out |= dict(mfu_executed_pct=100 * executed / peak_flops, mfu_nominal_pct=100 * nominal / peak_flops)
    return out


def time_combo(
    check: Check,
    deadline: float,
    base: Any,
    impl: str,
    remat: str,
    candidates: list[int],
    devices: list[jax.Device],
    options: Options,
) -> dict[str, Any]:
    """The step of `base` with this attention and remat at the first of `candidates` that fits."""
    from chexfound_jax import compile_check
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
            timed = _time_step(training, compiled, cfg, options)
        except Exception as e:
            del compiled, training
            gc.collect()
            if not is_out_of_memory(e):
                raise
            run["attempts"].append({**attempt, "status": "out of memory at run time", "error": error_text(e)})
            continue
        del compiled, training
        gc.collect()
        run["attempts"].append({**attempt, "status": "ok"})
        run.update(
            status="ok",
            per_device_batch=b,
            compile_s=round(compile_s, 2),
            compile_cache_hit=cache_hit,
            memory=memory,
            peak_gib=_gib(memory["peak"]),
            warmup_steps=options.warmup,
            **step_figures(cfg, timed, n, peak_flops),
        )
        if peak_flops:
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


def train_step_section(
    check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], options: Options
) -> None:
    from chexfound_jax.models.vit import remat_policy_name

    fitting = (check.result.get("compile_check") or {}).get("largest_fitting_batch")
    start = fitting or (TARGET_BATCH if not options.smoke else options.per_device_batches[-1])
    candidates = [b for b in options.per_device_batches if b <= start] or [start]
    own_remat = remat_policy_name(cfg.model.remat)
    # The config's own policy starts at the largest batch the compile check found to fit. The others' memory is
    # unknown and every try too large costs a whole compile: they start at --other_remat_batch (the target's 32)
    # and step down where it does not fit.
    other_start = min(start, options.other_remat_batch) if options.other_remat_batch > 0 else start
    out.update(
        {
            "config": options.config_name,
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
    for impl, remat in options.combos:
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
                    check, deadline, cfg, impl, remat, [b for b in candidates if b <= first], devices, options
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
