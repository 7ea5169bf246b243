r"""Size a pretraining job before paying for it: compile the real train step for a slice that is not there.

  python -m chexfound_jax.compile_check --config=configs/pretrain/vitl16_512.py --topology=v5p-128 \
      --per_device_batch=32 [--out=fit.json] [--max_batch] [--config.model.remat=full ...]

`--topology` is a Cloud TPU accelerator type (v4-32, v5p-8, v5p-128, v5litepod-16, v6e-8), a JAX
topology (v5p:2x2x1; `--num_slices` joins several over DCN), or `local` (the devices present: a GPU,
or CPUs). The job's mesh and sharding rules come from the config (or --mesh / --rules) and the step
is compiled for abstract sharded inputs, so nothing is allocated: for TPUs this runs the real XLA:TPU
compiler from libtpu on a CPU machine (`pip install -e '.[tpu]'`). It reports the per-device buffer
sizes against the chip's HBM, the compile time, the matmul FLOPs the compiled program executes
(loops counted by their trip counts; remat recomputation included) next to the analytic executed
and nominal FLOPs, the bytes of each collective kind per step, and a roofline lower bound on the step
time from the chip's public peak FLOP/s, HBM and interconnect bandwidths (chexfound_jax.hardware).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

from chexfound_jax.parallel import topology as topology_lib

topology_lib.quiet_libtpu()  # before jax loads libtpu

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from chexfound_jax import cli, hardware  # noqa: E402
from chexfound_jax.models import attention  # noqa: E402
from chexfound_jax.models.vit import remat_policy_name  # noqa: E402
from chexfound_jax.parallel import hlo_stats, sharding  # noqa: E402
from chexfound_jax.parallel import mesh as mesh_lib  # noqa: E402
from chexfound_jax.train import flops as flops_lib  # noqa: E402
from chexfound_jax.train.setup import Training, build_training  # noqa: E402
from data_prep import retired_flags  # noqa: E402

GIB = 1024**3
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "vitl16_512.py"


def memory_figures(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's per-device buffer sizes in bytes; peak = argument + output + temp - alias (donated state)."""
    m = compiled.memory_analysis()
    figures = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
        "host_temp": getattr(m, "host_temp_size_in_bytes", 0),
    }
    figures["peak"] = figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    return figures


def abstract_inputs(training: Training) -> tuple[Any, Any]:
    """(state, batch) as ShapeDtypeStructs carrying their shardings: what `lower` needs, nothing allocated."""
    return (
        sharding.with_shardings(training.abstract_state, training.state_shardings),
        sharding.with_shardings(training.batch_spec, training.batch_shardings),
    )


def compile_abstract(
    training: Training, compiler_options: dict[str, Any] | None = None
) -> tuple[jax.stages.Compiled, float]:
    """The step compiled for abstract sharded inputs, and the compile seconds (lowering included)."""
    platform = training.mesh.devices.flat[0].platform
    return compile_jitted(training.step, abstract_inputs(training), platform, compiler_options)


def compile_jitted(
    fn: Any, args: tuple, platform: str, compiler_options: dict[str, Any] | None = None
) -> tuple[jax.stages.Compiled, float]:
    """A jitted function compiled for `args` (ShapeDtypeStructs with shardings on devices of `platform`), and the
    compile seconds (lowering included)."""
    deviceless = platform == "tpu" and jax.default_backend() != "tpu"
    t0 = time.perf_counter()
    # A deviceless executable cannot be read back from the persistent cache: do not write it there.
    with _no_persistent_cache() if deviceless else contextlib.nullcontext():
        compiled = fn.lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - t0


@contextlib.contextmanager
def _no_persistent_cache() -> Any:
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def job_config(cfg: Any, per_device_batch: int, num_devices: int, groups_per_device: int = 1) -> Any:
    """`cfg` with the global batch of `per_device_batch` images per device, in groups_per_device groups each."""
    if per_device_batch < 1 or per_device_batch % groups_per_device:
        raise ValueError(f"per_device_batch {per_device_batch} must be a positive multiple of {groups_per_device}")
    cfg = cfg.copy_and_resolve_references()
    cfg.train.global_batch_size = per_device_batch * num_devices
    cfg.train.batch_groups = groups_per_device * num_devices
    return cfg


def _global_tokens(cfg: Any) -> int:
    return 1 + cfg.model.num_register_tokens + (cfg.crops.global_crops_size // cfg.model.patch_size) ** 2


def is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


def describe(cfg: Any, topo: topology_lib.Topology, training: Training, rules: str, per_device_batch: int) -> dict:
    """What is compiled, where: the report's header."""
    chip = hardware.chip_for_device_kind(topo.device_kind)
    vit = training.model_cfg.backbone
    return {
        "topology": topo.name,
        "jax_topology": topo.jax_name,
        "num_slices": topo.num_slices,
        "chip": chip.name if chip else topo.device_kind,
        "device_kind": topo.device_kind,
        "num_devices": len(topo.devices),
        "mesh": {k: int(v) for k, v in training.mesh.shape.items()},
        "rules": rules,
        "per_device_batch": per_device_batch,
        "global_batch": cfg.train.global_batch_size,
        "batch_groups": cfg.train.batch_groups,
        "model": {
            "arch": cfg.model.arch,
            "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "dtype": vit.dtype,
            "remat": str(vit.remat),
            "attention_impl": str(vit.attention_impl),
            "scan_layers": vit.scan_layers,
            "ibot_chunk_size": int(cfg.ibot.get("loss_chunk_size", 0)),
        },
        "hbm_bytes": chip.hbm_bytes if chip else None,
        "jax": jax.__version__,
    }


def flop_figures(cfg: Any, topo: topology_lib.Topology, vit: Any, stats: Any, cost: dict) -> dict[str, float]:
    """Per device: the compiled matmul FLOPs against the analytic count of what the step executes."""
    n = len(topo.devices)
    group = cfg.train.global_batch_size // cfg.train.batch_groups
    analytic = flops_lib.train_flops_per_image(cfg, group_size=group)
    images = cfg.train.global_batch_size / n
    executed = analytic["executed_total"] * images
    # Attention in a Pallas kernel is a custom call, invisible to the matmul count: compare like with like.
    # Under remat the kernel's forward runs again in the backward pass, also unseen: added analytically.
    in_kernels = kernel_recompute = 0.0
    if attention.resolve(vit.attention_impl, topo.platform, vit.dtype, _global_tokens(cfg)) == "splash":
        kernel = flops_lib.global_attention_flops_per_image(cfg, group_size=group)
        in_kernels = kernel["executed"] * images
        if remat_policy_name(vit.remat) != "none":
            kernel_recompute = kernel["student_forward"] * images
    recomputed = stats.matmul_flops - (executed - in_kernels) + kernel_recompute
    return {
        "compiled_matmul": stats.matmul_flops,
        "analytic_executed": executed,
        "analytic_nominal": analytic["total"] * images,
        "attention_in_kernels": in_kernels,
        "attention_recomputed_in_kernels": kernel_recompute,
        "recompute_overhead": recomputed / executed,
        "cost_analysis": float(cost.get("flops", 0.0)),  # counts loop bodies once: not the step's total
        "unknown_loop_trip_counts": stats.unknown_trip_counts,
    }


def collective_figures(stats: hlo_stats.ProgramStats) -> dict[str, dict[str, float]]:
    """Count, buffer bytes and ring-model traffic of each collective kind, per device per step."""
    return {
        kind: {"count": s.count, "bytes": s.bytes, "ring_traffic_bytes": s.traffic}
        for kind, s in stats.collectives.items()
    }


def roofline(chip: hardware.Chip, global_batch: int, stats: Any, cost: dict) -> dict[str, Any]:
    """A lower bound on the step time: the slowest of compute, HBM traffic and interconnect traffic."""
    compute_s = stats.matmul_flops / chip.peak_bf16_flops
    hbm_s = float(cost.get("bytes accessed", 0.0)) / chip.hbm_bandwidth
    ici_s = sum(s.traffic for s in stats.collectives.values()) / (chip.interconnect_bandwidth / 2)
    bound = max(compute_s, hbm_s, ici_s)
    return {
        "compute_s": compute_s,
        "hbm_s": hbm_s,  # from cost_analysis bytes, which count loop bodies once: a weak bound
        "interconnect_s": ici_s,
        "step_s_lower_bound": bound,
        "bound_by": max((compute_s, "compute"), (hbm_s, "hbm"), (ici_s, "interconnect"))[1],
        "images_per_s_upper_bound": global_batch / bound if bound else None,
        "peak_bf16_flops": chip.peak_bf16_flops,
        "hbm_bandwidth": chip.hbm_bandwidth,
        "interconnect_bandwidth": chip.interconnect_bandwidth,
        "source": chip.source,
    }


def check(
    cfg: Any,
    topo: topology_lib.Topology,
    per_device_batch: int,
    mesh_axes: dict[str, int] | None = None,
    rules: str | None = None,
    groups_per_device: int = 1,
    hlo_path: str | None = None,
) -> dict[str, Any]:
    """Compiles the step of `cfg` at `per_device_batch` on `topo` and returns the report (a JSON-able dict).

    `hlo_path`: also write the optimised HLO text there (what the FLOP and collective counts read).
    """
    n = len(topo.devices)
    cfg = job_config(cfg, per_device_batch, n, groups_per_device)
    mesh_axes = dict(mesh_axes or cfg.parallel.mesh)
    rules = rules or cfg.parallel.rules
    training = build_training(cfg, mesh_axes, rules, topo.devices)
    chip = hardware.chip_for_device_kind(topo.device_kind)
    report = describe(cfg, topo, training, rules, per_device_batch)
    try:
        compiled, seconds = compile_abstract(training)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        report.update(fits=False, error=str(e).splitlines()[0][:500])
        return report
    memory = memory_figures(compiled)
    report["compile_s"] = round(seconds, 1)
    report["memory"] = memory
    report["fits"] = bool(memory["peak"] <= chip.hbm_bytes) if chip else None

    text = compiled.as_text()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(text)
    stats = hlo_stats.analyse(text, n)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    report["flops_per_device"] = flop_figures(cfg, topo, training.model_cfg.backbone, stats, cost)
    report["collectives_per_device"] = collective_figures(stats)
    if chip:
        report["roofline"] = roofline(chip, cfg.train.global_batch_size, stats, cost)
    return report


def search_max_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 4096) -> int:
    """The largest batch b <= limit with fits(b), assuming fit is monotone: doubling up from `start`
    while it fits (or halving down while it does not), then bisection. Returns 0 when even 1 does not fit.
    """
    lo, hi = 0, None
    b = min(max(start, 1), limit)
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return b
            b = min(2 * b, limit)
        else:
            hi = b
    while lo == 0:
        b //= 2
        if b < 1:
            return 0
        if fits(b):
            lo = b
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch_search(
    run: Callable[[int], dict[str, Any]], start: int, device_kind: str, show: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """search_max_batch over compile reports `run(batch)`, each printed with `show` as it comes; a chip of unknown
    HBM capacity is a usage error. Returns {"max_per_device_batch", "reports" (in batch order)}."""
    reports: dict[int, dict[str, Any]] = {}

    def fits(b: int) -> bool:
        reports[b] = run(b)
        print(show(reports[b]), end="\n\n", flush=True)
        if reports[b]["fits"] is None:
            raise app.UsageError(f"{device_kind}: no HBM capacity known, so --max_batch cannot decide")
        return reports[b]["fits"]

    best = search_max_batch(fits, start)
    return {"max_per_device_batch": best, "reports": [reports[b] for b in sorted(reports)]}


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"topology {r['topology']} ({r['jax_topology']}, {r['num_slices']} slice(s)): {r['num_devices']} x"
        f" {r['chip']}; mesh {r['mesh']}, rules {r['rules']}",
        f"batch {r['per_device_batch']} per device, {r['global_batch']} global in {r['batch_groups']} groups;"
        f" model {r['model']}",
    ]
    if "memory" not in r:
        lines.append(f"does NOT fit: {r.get('error')}")
        return "\n".join(lines)
    m = r["memory"]
    hbm = f" of {r['hbm_bytes'] / GIB:.1f} GiB HBM: {'fits' if r['fits'] else 'does NOT fit'}" if r["hbm_bytes"] else ""
    lines += [
        f"compile {r['compile_s']:.1f} s",
        "per device: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in m.items() if k != "peak"),
        f"peak {m['peak'] / GIB:.2f} GiB{hbm}",
    ]
    f = r["flops_per_device"]
    lines.append(
        f"FLOPs per device per step: compiled matmul {f['compiled_matmul'] / 1e12:.2f} T, analytic executed"
        f" {f['analytic_executed'] / 1e12:.2f} T, nominal {f['analytic_nominal'] / 1e12:.2f} T;"
        f" recompute overhead {100 * f['recompute_overhead']:.1f}%"
    )
    lines.append(
        "collectives per device per step: "
        + ", ".join(f"{k} {v['count']}x {v['bytes'] / GIB:.2f} GiB" for k, v in r["collectives_per_device"].items())
    )
    if "roofline" in r:
        rl = r["roofline"]
        lines.append(
            f"roofline: compute {rl['compute_s'] * 1e3:.1f} ms, HBM {rl['hbm_s'] * 1e3:.1f} ms, interconnect"
            f" {rl['interconnect_s'] * 1e3:.1f} ms -> step >= {rl['step_s_lower_bound'] * 1e3:.1f} ms"
            f" ({rl['bound_by']}-bound), <= {rl['images_per_s_upper_bound']:.0f} images/s"
        )
    return "\n".join(lines)


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program, so that importing the module (bench/train_step.py
    does) claims no flag names: --config, --mesh and --rules are the importer's own."""
    help_config = "Pretraining config file (default configs/pretrain/vitl16_512.py); --config.a.b=v overrides."
    config_flags.DEFINE_config_file("config", None, help_config)
    flags.DEFINE_string("topology", "local", "v5p-8, v5p-128, v4-32, v5litepod-16, v6e-8, v5p:2x2x1 or local.")
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN (multi-slice).")
    flags.DEFINE_integer("per_device_batch", 8, "Images per device (global batch = this x devices).")
    flags.DEFINE_integer("groups_per_device", 1, "Batch groups (official per-GPU batches) per device.")
    flags.DEFINE_string("mesh", None, "Mesh axes, e.g. 'fsdp=-1' or 'data=2,fsdp=-1'; default the config's.")
    flags.DEFINE_string("rules", None, "Sharding rules (fsdp, data_parallel); default the config's.")
    flags.DEFINE_bool("max_batch", False, "Search the largest per-device batch that fits (from --per_device_batch).")
    flags.DEFINE_string("out", None, "Write the report (or the search's reports) to this JSON file.")
    retired_flags.define_renamed("json", "out")
    flags.DEFINE_string("hlo", None, "Write the optimised HLO text to this file (the last compile's).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cfg = f.config
    try:
        topo = topology_lib.get_topology(f.topology, f.num_slices)
        mesh_axes = mesh_lib.parse_mesh(f.mesh) if f.mesh else None
    except (ValueError, RuntimeError) as e:
        raise app.UsageError(str(e)) from None
    run = lambda b: check(cfg, topo, b, mesh_axes, f.rules, f.groups_per_device, f.hlo)
    if not f.max_batch:
        report = run(f.per_device_batch)
        print(format_report(report))
        out: Any = report
    else:
        out = max_batch_search(run, f.per_device_batch, topo.device_kind, format_report)
        print(f"largest per-device batch that fits: {out['max_per_device_batch']}")
    if f.out:
        pathlib.Path(f.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    cli.run(main, default_config=DEFAULT_CONFIG)
