"""Throughput and memory of the full pretraining step (teacher + student + AdamW + EMA), per device.

Timing mode builds the sharded state (chexfound_jax.train.setup), compiles the step
ahead of time (the compile time is printed), runs --warmup steps, then times --steps steps, each
waited on with block_until_ready on its metrics; the median is reported. Batches are random normal
crops with real iBOT masks (data.collate), placed on the devices before timing, so the figures are
the step alone, not the input pipeline. TFLOP/s uses the analytic model FLOPs of
chexfound_jax.train.flops (the numerator of MFU), not XLA's count, side by side: executed (what
the step runs: subset drop path skips student rows; the MFU that counts) and nominal (every row
through every block). MFU divides the per-device TFLOP/s by --peak_tflops, by default the bf16
dense peak of chexfound_jax.hardware for the device kind (none for CPUs).

--memory_only compiles the step for abstract inputs (jax.ShapeDtypeStruct with their shardings:
the state from jax.eval_shape of its init, the batch from batch_layout.batch_spec) and prints XLA's
buffer assignment (compiled.memory_analysis()) per device; nothing is allocated, so it sizes
batches for a machine one does not have.

Usage, from the repository root:
    python -m bench.train_step --mesh=data=1 --steps=10
    python -m bench.train_step --config=configs/pretrain/vitl16_512.py --mesh=data=1 \
        --config.train.global_batch_size=16 --config.train.batch_groups=1 --memory_only
    python -m bench.train_step --config=configs/pretrain/vitl16_512.py --mesh=data=-1 \
        --config.train.global_batch_size=32 --config.train.batch_groups=-1 --attention_impl=cudnn

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import timing
from chexfound_jax import cli, hardware
from chexfound_jax.compile_check import compile_abstract, memory_figures
from chexfound_jax.data.collate import synthetic_batch
from chexfound_jax.models.vit import count_params
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.train import flops as flops_lib
from chexfound_jax.train.setup import Training, build_training

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.py"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    help_config = "Pretraining config file (default configs/pretrain/tiny_cpu.py); --config.a.b=value overrides."
    config_flags.DEFINE_config_file("config", None, help_config, lock_config=True, **fv)
    flags.DEFINE_string("mesh", None, "Mesh axes, e.g. 'data=-1' or 'data=2,fsdp=4'; default the config's.", **fv)
    flags.DEFINE_string("rules", None, "Sharding rule table (data_parallel, fsdp); default the config's.", **fv)
    flags.DEFINE_enum(
        "attention_impl",
        None,
        ["xla", "cudnn", "splash", "auto"],
        "Shortcut for --config.model.attention_impl; default the config's.",
        **fv,
    )
    flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0, **fv)
    flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for MFU; default by device kind.", **fv)
    flags.DEFINE_bool("memory_only", False, "Compile for abstract inputs and print memory; no run.", **fv)


GIB = 1024**3


def _print_memory(figures: dict[str, int]) -> None:
    print(
        "memory per device (XLA buffer assignment): "
        + ", ".join(f"{k} {v / GIB:.4f} GiB" for k, v in figures.items() if k != "peak")
    )
    print(f"peak (argument + output + temp - alias): {figures['peak'] / GIB:.4f} GiB per device")


def throughput_lines(flops: dict[str, float], images_per_s: float, num_devices: int, peak: float | None) -> str:
    """Per-device TFLOP/s and MFU (of `peak` FLOP/s, if known) of the executed and nominal counts, side by side."""
    executed = flops["executed_total"] * images_per_s / num_devices
    nominal = flops["total"] * images_per_s / num_devices
    lines = [f"TFLOP/s per device: executed {executed / 1e12:.4g}, nominal {nominal / 1e12:.4g}"]
    if peak:
        mfu, mfu_nominal = 100 * executed / peak, 100 * nominal / peak
        lines.append(f"MFU: executed {mfu:.1f}%, nominal {mfu_nominal:.1f}% of {peak / 1e12:g} TFLOP/s")
    return "\n".join(lines)


def _summary(cfg: Any, training: Training, mesh_axes: dict[str, int], rules_name: str) -> str:
    vit = training.model_cfg.backbone
    c = cfg.crops
    groups = training.batch_spec["global_crops"].shape[0]
    return (
        f"config: {cfg.model.arch}/{vit.patch_size} (embed {vit.embed_dim}, depth {vit.depth}) global batch"
        f" {cfg.train.global_batch_size} in {groups} group(s), crops 2x{c.global_crops_size} +"
        f" {c.local_crops_number}x{c.local_crops_size}, dtype {vit.dtype}, remat {vit.remat},"
        f" attention {vit.attention_impl or 'default (XLA)'},"
        f" mesh {dict(training.mesh.shape)} (from {mesh_axes}), rules {rules_name}"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cfg = f.config
    if f.attention_impl:
        cfg.model.attention_impl = f.attention_impl
    try:
        mesh_axes = mesh_lib.parse_mesh(f.mesh) if f.mesh else dict(cfg.parallel.mesh)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    rules_name = f.rules or cfg.parallel.rules
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s) visible)")
    print(f"jax {jax.__version__}")

    training = build_training(cfg, mesh_axes, rules_name)
    print(_summary(cfg, training, mesh_axes, rules_name))
    print(f"params: {count_params(training.abstract_state.student) / 1e6:.1f} M (student)")
    if f.memory_only:
        compiled, compile_s = compile_abstract(training)
        print(f"compile (abstract inputs, nothing allocated): {compile_s:.1f} s")
        _print_memory(memory_figures(compiled))
        return

    t0 = time.perf_counter()
    state = training.init_state()
    jax.block_until_ready(state)
    print(f"state created in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(cfg.train.seed)
    batches = [
        jax.device_put(synthetic_batch(cfg, training.batch_spec, rng), training.batch_shardings) for _ in range(2)
    ]

    t0 = time.perf_counter()
    compiled = training.step.lower(state, batches[0]).compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    _print_memory(memory_figures(compiled))

    state, metrics, times = timing.time_steps(compiled, state, batches, f.warmup, f.steps)

    step_s = statistics.median(times)
    groups = training.batch_spec["global_crops"].shape[0]
    flops = flops_lib.train_flops_per_image(cfg, cfg.train.global_batch_size // groups)
    images_per_s = cfg.train.global_batch_size / step_s
    peak = hardware.peak_flops(device.device_kind, f.peak_tflops * 1e12 if f.peak_tflops else None)
    executed, nominal = flops["executed_total"], flops["total"]
    print(
        f"model FLOPs per image (teacher fwd, student fwd + bwd, heads): executed {executed / 1e9:.4g} GFLOP,"
        f" nominal {nominal / 1e9:.4g} GFLOP (nominal / executed {nominal / executed:.3f})"
    )
    print(
        f"step time: median {step_s * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
        f" over {len(times)} steps (loss {float(metrics['total_loss']):.4f})"
    )
    print(f"steps/s: {1 / step_s:.3f}")
    print(f"images/s (global): {images_per_s:.2f}")
    print(throughput_lines(flops, images_per_s, training.mesh.size, peak))


if __name__ == "__main__":
    define_flags()
    cli.run(main, default_config=DEFAULT_CONFIG)
