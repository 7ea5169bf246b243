r"""One-process GPU check of the pretraining recipe: fit, step MFU, backbone forward, on-device photometry.

    bash bench/gpu_check.sh [OUT.json]         # on a machine with one H100 / H200 (installs, then runs this)
    python -m bench.gpu_check --out=OUT.json   # the same, with the package importable
    python -m bench.gpu_check --smoke --out=OUT.json   # CPU, configs/pretrain/tiny_cpu.py: proves it runs

Sections, all in one JSON (rewritten after every section and every timed combination, so a run cut
short still leaves what it measured) and a short summary on stdout:

  environment      jax / jaxlib / Python versions, the device kind and count, the chip's public figures
                   (chexfound_jax.hardware), the allocator's byte limit.
  vit_forward      the paper backbone (ViT-L/16 reg4 SwiGLU at 512 px) forward in bf16, batch 32:
                   images/s and analytic TFLOP/s (chexfound_jax.models.flops), per attention implementation.
  finish_on_device jit(pipeline.finish_on_device) on a pipeline batch of 32 images (uint8 crops and
                   photometric parameters made by the pipeline's own per-example and grouping steps from
                   synthetic X-ray-sized images): ms per image. Where the pipeline module cannot be imported
                   (it needs grain, tensorflow_datasets, array_record), copies of those steps run
                   (bench/gpu_check_photometry.py).
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

This file holds the command line, the time budget (`Check`) and the environment section; the other
sections are in bench/gpu_check_forward.py, gpu_check_photometry.py and gpu_check_step.py, the targets,
verdicts and summary in bench/gpu_check_report.py.

--smoke runs every section on the CPU with the tiny config, tiny batches and one timed step (CI proves
the script end to end with it; tests/test_gpu_check.py); there the chip is unknown, so "fits" is None
and the first batch that compiles is taken. Nothing is asserted here: this is a measurement.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_T0 = time.perf_counter()  # the budget counts the imports too

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import monitoring  # noqa: E402

from bench.gpu_check_forward import vit_forward  # noqa: E402
from bench.gpu_check_photometry import finish_on_device  # noqa: E402
from bench.gpu_check_report import TARGET_BATCH, _failed, _gib, error_text, summary, verdicts  # noqa: E402
from bench.gpu_check_step import (  # noqa: E402
    _count_cache_hits,
    allocator_limit,
    compile_check_section,
    train_step_section,
)
from chexfound_jax import cli, hardware  # noqa: E402
from data_prep import retired_flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# cudnn:full first: the paper config's own step ("auto" attention is cuDNN on a GPU), which the compile check
# has just compiled, so the persistent cache serves it and it costs no compile.
DEFAULT_COMBOS = "cudnn:full,cudnn:dots,xla:dots,xla:full"
# Smoke: the CPU has no cuDNN (recorded as skipped), then xla with the tiny config's own remat: the step the
# compile check has just compiled, so the persistent cache serves it and the smoke run stays one step compile.
SMOKE_COMBOS = "cudnn:dots,xla:<the config's remat>"
RENAMED = {"json": "out", "batches": "per_device_batches"}  # old flag -> new (data_prep.retired_flags)
Combo = tuple[str, str]  # (attention implementation, remat policy)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the check runs: the command line, typed, with the mode's defaults filled in (make_options)."""

    out: str | None
    smoke: bool
    budget_s: float  # whole-process seconds
    per_device_batches: tuple[int, ...]  # largest first
    combos: tuple[Combo, ...] | None  # None: SMOKE_COMBOS, decided once the config is loaded
    steps: int
    warmup: int
    other_remat_batch: int
    num_devices: int  # 0: all local ones
    no_compile_cache: bool

    @property
    def forward_batch(self) -> int:
        return 2 if self.smoke else 32

    @property
    def forward_iters(self) -> int:
        return 1 if self.smoke else 10

    @property
    def fod_images(self) -> int:
        return 2 if self.smoke else 32

    @property
    def fod_repeats(self) -> int:
        return 1 if self.smoke else 10

    @property
    def config_name(self) -> str:
        return "configs/pretrain/tiny_cpu.py" if self.smoke else "configs/pretrain/vitl16_512.py"


def parse_combos(items: list[str]) -> tuple[Combo, ...]:
    """['cudnn:dots', 'xla:full'] -> (('cudnn', 'dots'), ('xla', 'full'))."""
    combos = tuple(tuple(c.strip().split(":")) for c in items if c.strip())
    for c in combos:
        if len(c) != 2 or c[0] not in ("xla", "cudnn") or c[1] not in ("none", "full", "dots", "offload"):
            raise ValueError(f"--combos wants attention:remat pairs (xla|cudnn : none|full|dots|offload), got {c}")
    return combos  # type: ignore[return-value]


def make_options(
    *,
    out: str | None = "gpu_check.json",
    smoke: bool = False,
    budget_s: float | None = None,
    per_device_batches: list[int] | None = None,
    combos: list[str] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    other_remat_batch: int = TARGET_BATCH,
    num_devices: int = 1,
    no_compile_cache: bool = False,
) -> Options:
    """Options with what is not given set for the mode (GPU, or --smoke on the CPU)."""
    batches = per_device_batches or ([4, 2] if smoke else [64, 48, 32, 16])
    return Options(
        out=out,
        smoke=smoke,
        budget_s=budget_s or (300.0 if smoke else 510.0),
        per_device_batches=tuple(sorted(set(batches), reverse=True)),
        combos=parse_combos(combos or DEFAULT_COMBOS.split(",")) if combos or not smoke else None,
        steps=steps if steps is not None else (1 if smoke else 5),
        warmup=warmup if warmup is not None else (1 if smoke else 2),
        other_remat_batch=other_remat_batch,
        num_devices=num_devices,
        no_compile_cache=no_compile_cache,
    )


# --- plumbing --------------------------------------------------------------------------------------


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


# --- sections --------------------------------------------------------------------------------------


def environment(devices: list[jax.Device], smoke: bool) -> dict[str, Any]:
    import jaxlib

    d = devices[0]
    chip = hardware.chip_for_device_kind(d.device_kind)
    out: dict[str, Any] = {
        "mode": "smoke" if smoke else "gpu",
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


# --- main ------------------------------------------------------------------------------------------


def _devices(options: Options) -> list[jax.Device]:
    """Environment and jax set up for the mode (before the backend starts); the devices the check uses."""
    # jax preallocates 75% of GPU memory by default; the step at the largest batch wants more of the 80 GB.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if not flags.FLAGS.is_parsed():  # library code may read absl flags (their defaults here)
        flags.FLAGS.mark_as_parsed()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/ is not an installed package
    if options.smoke:
        # LLVM at -O0 (same buffers, a faster CPU compile), set before the CPU backend starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if not options.no_compile_cache and not jax.config.jax_compilation_cache_dir:
        # A fresh persistent cache: the step the compile check builds (the config's own attention and
        # remat) is then not compiled a second time when the same step is timed.
        cache_dir = tempfile.mkdtemp(prefix="gpu_check_cache_")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    monitoring.register_event_listener(_count_cache_hits)
    devices = jax.devices("cpu") if options.smoke else jax.devices()
    return devices[: options.num_devices] if options.num_devices > 0 else devices


def _record(options: Options) -> dict[str, Any]:
    return {**dataclasses.asdict(options), "combos": [":".join(c) for c in options.combos or ()]}


def run(options: Options) -> dict[str, Any]:
    """Every section, saved to options.out as it goes; returns the result with targets and summary."""
    devices = _devices(options)
    check = Check(options.out, options.budget_s, est_compile_s=5.0 if options.smoke else 60.0)
    check.result = {"mode": "smoke" if options.smoke else "gpu", "config": options.config_name}
    check.result["args"] = _record(options)
    check.section("environment", lambda d, out: out.update(environment(devices, options.smoke)), max_s=60)
    cfg = None
    try:
        cfg = base_config(options.smoke)
    except Exception as e:
        check.result["config_error"] = _failed(e)
        for name in ("vit_forward", "finish_on_device", "compile_check", "train_step"):
            check.result[name] = {"status": "error", "error": f"no config: {check.result['config_error']['error']}"}
    if cfg is not None and options.combos is None:  # smoke: see SMOKE_COMBOS
        from chexfound_jax.models.vit import remat_policy_name

        options = dataclasses.replace(options, combos=(("cudnn", "dots"), ("xla", remat_policy_name(cfg.model.remat))))
        check.result["args"] = _record(options)
    if cfg is not None:
        _sections(check, cfg, devices, options)
    check.result["targets"] = verdicts(check.result)
    check.result["total_s"] = round(check.elapsed(), 1)
    lines = summary(check.result)
    check.result["summary"] = lines
    check.save()
    print("\n" + "\n".join(lines), flush=True)
    if options.out:
        print(f"figures: {options.out}", flush=True)
    return check.result


def _sections(check: Check, cfg: Any, devices: list[jax.Device], options: Options) -> None:
    """The measuring sections in order, each with its share of the budget."""
    train_reserve = 0.0 if options.smoke else 240.0  # what the compile check leaves to the timed steps
    check.section(
        "vit_forward",
        lambda d, out: vit_forward(check, d, out, cfg, devices, options),
        max_s=75,
        reserve_s=train_reserve + 150,
    )
    check.section(
        "finish_on_device",
        lambda d, out: finish_on_device(check, d, out, cfg, devices, options),
        max_s=45,
        reserve_s=train_reserve + 120,
    )
    check.section(
        "compile_check",
        lambda d, out: compile_check_section(check, d, out, cfg, devices, options),
        max_s=240,
        reserve_s=train_reserve,
    )
    check.section(
        "train_step",
        lambda d, out: train_step_section(check, d, out, cfg, devices, options),
        max_s=options.budget_s,
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("out", "gpu_check.json", "Write every figure here (rewritten as sections finish).", **fv)
    flags.DEFINE_bool("smoke", False, "CPU, tiny config, tiny batches, one timed step.", **fv)
    flags.DEFINE_float("budget_s", None, "Whole-process seconds (default 510; smoke 300).", **fv)
    flags.DEFINE_list(
        "per_device_batches", None, "Per-device batches to try, largest first (default 64,48,32,16).", **fv
    )
    flags.DEFINE_list(
        "combos",
        None,
        f"attention:remat pairs to time, in order (default {DEFAULT_COMBOS}; smoke {SMOKE_COMBOS}).",
        **fv,
    )
    flags.DEFINE_integer("steps", None, "Timed steps (default 5; smoke 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", None, "Warm-up steps / forwards (default 2; smoke 1).", lower_bound=0, **fv)
    flags.DEFINE_integer(
        "other_remat_batch",
        TARGET_BATCH,
        "Per-device batch that remat policies other than the config's start at (then smaller ones where it does not"
        " fit; the config's own policy starts at the largest batch the compile check fitted). 0: that largest batch"
        " for all.",
        lower_bound=0,
        **fv,
    )
    flags.DEFINE_integer("num_devices", 1, "Devices to use (0: all local ones).", lower_bound=0, **fv)
    flags.DEFINE_bool("no_compile_cache", False, "No persistent compilation cache (GPU mode).", **fv)
    for old, new in RENAMED.items():
        retired_flags.define_renamed(old, new, flag_values=flag_values)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not all(b.isdigit() and int(b) > 0 for b in f.per_device_batches or ()):
        raise app.UsageError(f"--per_device_batches wants positive integers, got {','.join(f.per_device_batches)}")
    try:
        options = make_options(
            out=f.out,
            smoke=f.smoke,
            budget_s=f.budget_s,
            per_device_batches=[int(b) for b in f.per_device_batches or ()],
            combos=f.combos,
            steps=f.steps,
            warmup=f.warmup,
            other_remat_batch=f.other_remat_batch,
            num_devices=f.num_devices,
            no_compile_cache=f.no_compile_cache,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run(options)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
