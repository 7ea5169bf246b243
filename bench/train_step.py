"""Throughput and memory of the full pretraining step (teacher + student + AdamW + EMA), per device.

Timing mode builds the sharded state (chexfound_jax.train.setup), compiles the step
ahead of time (the compile time is printed), runs --warmup steps, then times --steps steps, each
waited on with block_until_ready on its metrics; the median is reported. Batches are random normal
crops with real iBOT masks (data.collate), placed on the devices before timing, so the figures are
the step alone, not the input pipeline. TFLOP/s uses the analytic model FLOPs of
chexfound_jax.train.flops (the numerator of MFU), not XLA's count; MFU divides the per-device
TFLOP/s by --peak_tflops, by default the bf16 dense peak of a known accelerator (none for CPUs).

--memory_only compiles the step for abstract inputs (jax.ShapeDtypeStruct with their shardings:
the state from jax.eval_shape of its init, the batch from recipe.batch_spec) and prints XLA's
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

from chexfound_jax.data.collate import synthetic_batch
from chexfound_jax.models.vit import count_params
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.train import flops as flops_lib
from chexfound_jax.train.setup import Training, build_training

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Pretraining config file; override fields with --config.a.b=value."
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh axes, e.g. 'data=-1' or 'data=2,fsdp=4'; default the config's.")
_RULES = flags.DEFINE_string("rules", None, "Sharding rule table (data_parallel, fsdp); default the config's.")
_ATTN = flags.DEFINE_enum(
    "attention_impl",
    None,
    ["xla", "cudnn"],
    "Sets config model.attention_impl; default the config's. (A config field that is None, as this one is"
    " by default, cannot be set with --config.model.attention_impl.)",
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for MFU; default by device kind.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Compile for abstract inputs and print memory; no run.")

# Dense bf16 peak TFLOP/s per device, matched as substrings of device_kind in this order (the more
# specific names first: "TPU v5 lite" is v5e, "TPU v5" alone is v5p; an H100 PCIe is slower).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)

GIB = 1024**3


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {"data": 2, "fsdp": 4}; one size may be -1 (the remaining devices)."""
    usage = f"--mesh wants comma-separated axis=size pairs with axes from {mesh_lib.MESH_AXES}, e.g. 'data=2,fsdp=4'"
    axes: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or name not in mesh_lib.MESH_AXES or name in axes:
            raise ValueError(f"{usage}; got {text!r} (bad or repeated item {item!r})")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(f"{usage}; got {text!r} (size {size!r} is not an integer)") from None
        if axes[name] < 1 and axes[name] != -1:
            raise ValueError(f"{usage}; got {text!r} (size {axes[name]} must be positive or -1)")
    return axes


def default_peak_tflops(device_kind: str) -> float | None:
    """The table's peak for this device kind, or None (CPUs, unknown chips: MFU is not printed)."""
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def memory_figures(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's per-device buffer sizes in bytes; peak = argument + output + temp - alias (donated state)."""
    m = compiled.memory_analysis()
    figures = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
        "alias": m.alias_size_in_bytes,
    }
    figures["peak"] = figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    return figures


def compile_abstract(
    training: Training, compiler_options: dict[str, Any] | None = None
) -> tuple[dict[str, int], float]:
    """(memory figures, compile seconds) of the step for abstract sharded inputs.

    Allocates nothing, so it sizes a batch for memory one does not have. `compiler_options` go to
    XLA; {"xla_backend_optimization_level": 0} halves a CPU compile (LLVM only, same buffers).
    """
    state = _with_shardings(training.abstract_state, training.state_shardings)
    batch = _with_shardings(training.batch_spec, training.batch_shardings)
    t0 = time.perf_counter()
    compiled = training.step.lower(state, batch).compile(compiler_options)
    return memory_figures(compiled), time.perf_counter() - t0


def _print_memory(figures: dict[str, int]) -> None:
    print(
        "memory per device (XLA buffer assignment): "
        + ", ".join(f"{k} {v / GIB:.4f} GiB" for k, v in figures.items() if k != "peak")
    )
    print(f"peak (argument + output + temp - alias): {figures['peak'] / GIB:.4f} GiB per device")


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


def main(argv):
    del argv
    cfg = _CONFIG.value
    if _ATTN.value:
        cfg.model.attention_impl = _ATTN.value
    try:
        mesh_axes = parse_mesh(_MESH.value) if _MESH.value else dict(cfg.parallel.mesh)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    rules_name = _RULES.value or cfg.parallel.rules
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s) visible)")
    print(f"jax {jax.__version__}")

    training = build_training(cfg, mesh_axes, rules_name)
    print(_summary(cfg, training, mesh_axes, rules_name))
    print(f"params: {count_params(training.abstract_state.student) / 1e6:.1f} M (student)")
    if _MEMORY_ONLY.value:
        figures, compile_s = compile_abstract(training)
        print(f"compile (abstract inputs, nothing allocated): {compile_s:.1f} s")
        _print_memory(figures)
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

    for i in range(_WARMUP.value):
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics)
    times = []
    for i in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    flops = flops_lib.train_flops_per_image(cfg)["total"]
    images_per_s = cfg.train.global_batch_size / step_s
    tflops = flops * images_per_s / training.mesh.size / 1e12
    peak = _PEAK.value or default_peak_tflops(device.device_kind)
    print(f"model FLOPs per image: {flops / 1e9:.2f} GFLOP (teacher fwd, student fwd + bwd, heads)")
    print(
        f"step time: median {step_s * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
        f" over {len(times)} steps (loss {float(metrics['total_loss']):.4f})"
    )
    print(f"steps/s: {1 / step_s:.3f}")
    print(f"images/s (global): {images_per_s:.2f}")
    print(f"TFLOP/s per device: {tflops:.4g}")
    if peak:
        print(f"MFU: {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s")


if __name__ == "__main__":
    app.run(main)
