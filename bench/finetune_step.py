r"""Memory and time of the fine-tuning step: the backbone trained with its GLoRI head (backbone.adapt).

  python -m bench.finetune_step --topology=v5p-8 --per_device_batch=64 [--adapt=full,lora,bitfit] [--out=ft.json]
  python -m bench.finetune_step --topology=v5p-8 --max_batch --adapt=full       # the largest batch that fits
  python -m bench.finetune_step --topology=local --backbone=configs/pretrain/tiny_cpu.py \
      --config.data.image_size=64 --per_device_batch=4 --steps=10                # run and timed here

The backbone is a pretraining config's (`--backbone`, default ViT-L/16 reg4 of configs/pretrain/vitl16_512.py),
everything else the evaluation config's (`--config`, default configs/eval/finetune_cxrlt.py: GLoRI with the class
token on CXR-LT's 40 findings at 512, the backbone FSDP-sharded with block remat; `--config.x=` overrides), with
`backbone.adapt` set to each mode of `--adapt`. The step is eval/finetune.TunedBank's, compiled for abstract
sharded inputs: for a TPU topology by the real XLA:TPU compiler of libtpu on this machine, nothing allocated
(as chexfound_jax.compile_check does for pretraining), so the figures are the chip's buffer assignment
(peak = argument + output + temp - alias), the matmul FLOPs of the compiled program and the roofline lower bound on
the step time. With `--topology=local` the step also runs on random weights and images and is timed.

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import sys
from typing import Any

from chexfound_jax.parallel import topology as topology_lib

topology_lib.quiet_libtpu()  # before jax loads libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import timing  # noqa: E402
from chexfound_jax import cli, compile_check, hardware  # noqa: E402
from chexfound_jax.eval import finetune, tasks, workflows  # noqa: E402
from chexfound_jax.eval.probe import Optimization  # noqa: E402
from chexfound_jax.models.build import init_random  # noqa: E402
from chexfound_jax.models.vit import ViTConfig, count_params  # noqa: E402
from chexfound_jax.parallel import hlo_stats, sharding  # noqa: E402
from chexfound_jax.parallel import mesh as mesh_lib  # noqa: E402
from chexfound_jax.train import recipe  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "eval" / "finetune_cxrlt.py"
DEFAULT_BACKBONE = ROOT / "configs" / "pretrain" / "vitl16_512.py"
GIB = 1024**3


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    help_config = "Evaluation config (default configs/eval/finetune_cxrlt.py); --config.a.b=v overrides."
    config_flags.DEFINE_config_file("config", None, help_config, **fv)
    config_flags.DEFINE_config_file("backbone", str(DEFAULT_BACKBONE), "Pretraining config of the backbone.", **fv)
    flags.DEFINE_list("adapt", ["full", "lora", "bitfit"], "backbone.adapt modes to measure, in order.", **fv)
    flags.DEFINE_string("topology", "local", "v5p-8, v5p:1x1x1, v6e-8, ... or local (the devices present).", **fv)
    flags.DEFINE_integer("per_device_batch", 64, "Images per device (global batch = this x devices).", **fv)
    help_max = "Search the largest per-device batch that fits (from --per_device_batch)."
    flags.DEFINE_bool("max_batch", False, help_max, **fv)
    help_steps = "Timed steps with --topology=local (0: compile only)."
    flags.DEFINE_integer("steps", 0, help_steps, lower_bound=0, **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.", lower_bound=0, **fv)
    flags.DEFINE_string("out", None, "Write the reports to this JSON file.", **fv)


def bank_for(cfg: Any, vit: ViTConfig, mode: str, mesh: Any, params: dict | None) -> finetune.TunedBank:
    """The TunedBank of `cfg` with backbone.adapt = mode on `mesh`; `params=None`: shapes only."""
    cfg = cfg.copy_and_resolve_references()
    cfg.backbone.adapt = mode
    adapt = finetune.adaptation(cfg)
    b = cfg.backbone
    features = finetune.AdaptedFeatures(vit, params, int(b.n_last_blocks), b.dtype, adapt, mesh, cfg.parallel.rules)
    num_classes = len(tasks.task_from_config(cfg.task).class_names)
    head = workflows.head_config(cfg.head, features, num_classes)
    t = cfg.train
    opt = Optimization(tuple(t.lrs), t.weight_decay, t.asymmetric_loss)
    return finetune.TunedBank(head, opt, features, mesh)


def abstract_step_inputs(bank: finetune.TunedBank, global_batch: int, image_size: int) -> tuple:
    """(state, backbone, batch, rng) of the train step as ShapeDtypeStructs with their shardings."""
    state = sharding.with_shardings(bank.abstract_state(), bank.shardings)
    rows = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32, sharding=bank.batch_sharding)
    images = (global_batch, image_size, image_size, 3)
    batch = {"image": rows(images), "labels": rows((global_batch, bank.cfg.num_classes))}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=bank.replicated)
    return state, bank.features.state, batch, rng


def trainable_params(bank: finetune.TunedBank) -> tuple[int, int]:
    """(trainable backbone parameters, all backbone parameters)."""
    return count_params(bank.features.initial), count_params(bank.features.state)


def measure(cfg: Any, vit: ViTConfig, mode: str, topo: topology_lib.Topology, per_device_batch: int,
            steps: int = 0, warmup: int = 2) -> dict[str, Any]:  # fmt: skip
    """One mode at one batch: the compiled step's figures (and, with `steps`, its timing here)."""
    n = len(topo.devices)
    mesh = mesh_lib.create_mesh(dict(cfg.parallel.mesh), topo.devices)
    size = int(cfg.data.image_size)
    timed = steps > 0
    params = None
    if timed:
        _, state = init_random(vit, int(cfg.train.seed))
        params = nnx.to_pure_dict(state)
    bank = bank_for(cfg, vit, mode, mesh, params)
    chip = hardware.chip_for_device_kind(topo.device_kind)
    trainable, total = trainable_params(bank)
    report: dict[str, Any] = {
        "adapt": mode,
        "topology": topo.name,
        "chip": chip.name if chip else topo.device_kind,
        "num_devices": n,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "rules": str(cfg.parallel.rules),
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * n,
        "image_size": size,
        "backbone": {"embed_dim": vit.embed_dim, "depth": vit.depth, "patch_size": vit.patch_size},
        "remat": str(bank.features.cfg.remat),
        "dtype": str(cfg.backbone.dtype),
        "head": {"kind": bank.cfg.kind, "num_classes": bank.cfg.num_classes, "cat_cls": bank.cfg.cat_cls},
        "trainable_backbone_params": trainable,
        "backbone_params": total,
        "hbm_bytes": chip.hbm_bytes if chip else None,
        "jax": jax.__version__,
    }
    inputs = abstract_step_inputs(bank, per_device_batch * n, size)
    try:
        compiled, seconds = compile_check.compile_jitted(bank.train_step, inputs, topo.platform)
    except Exception as e:
        if not compile_check.is_out_of_memory(e):
            raise
        report.update(fits=False, error=str(e).splitlines()[0][:500])
        return report
    report["compile_s"] = round(seconds, 1)
    memory = compile_check.memory_figures(compiled)
    report["memory"] = memory
    report["fits"] = bool(memory["peak"] <= chip.hbm_bytes) if chip else None
    stats = hlo_stats.analyse(compiled.as_text(), n)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    report["compiled_matmul_flops_per_device"] = stats.matmul_flops
    report["collectives_per_device"] = compile_check.collective_figures(stats)
    if chip:
        report["roofline"] = compile_check.roofline(chip, per_device_batch * n, stats, cost)
    if timed:
        report["timing"] = time_step(bank, compiled, per_device_batch * n, size, steps, warmup)
    return report


def time_step(bank: finetune.TunedBank, compiled: Any, global_batch: int, size: int, steps: int, warmup: int) -> dict:
    """Seconds per step of the compiled step on random images and labels, placed on the devices first."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((global_batch, size, size, 3), np.float32),
        "labels": (rng.random((global_batch, bank.cfg.num_classes)) < 0.3).astype(np.float32),
    }
    batch = jax.device_put(batch, bank.batch_sharding)
    state = bank.init(0, total_steps=warmup + steps)
    backbone = bank.features.state
    key = jax.device_put(jax.random.key(1), bank.replicated)
    step = lambda s, b: compiled(s, backbone, b, key)
    _, losses, times = timing.time_steps(step, state, [batch], warmup, steps)
    median = statistics.median(times)
    return {
        "steps": steps,
        "step_s_median": median,
        "step_s_min": min(times),
        "images_per_s": global_batch / median,
        "loss": float(np.asarray(losses).mean()),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"adapt={r['adapt']}: {r['topology']} {r['num_devices']} x {r['chip']}, mesh {r['mesh']}, rules {r['rules']};"
        f" batch {r['per_device_batch']} per device ({r['global_batch']} global) at {r['image_size']} px;"
        f" backbone trains {r['trainable_backbone_params'] / 1e6:.3f} M of {r['backbone_params'] / 1e6:.4g} M"
        f" parameters, remat {r['remat']}, {r['dtype']}; head {r['head']}"
    ]
    if "memory" not in r:
        return "\n".join([*lines, f"  does NOT fit: {r.get('error')}"])
    m = r["memory"]
    hbm = f" of {r['hbm_bytes'] / GIB:.1f} GiB: {'fits' if r['fits'] else 'does NOT fit'}" if r["hbm_bytes"] else ""
    lines += [
        f"  compile {r['compile_s']:.1f} s; per device: argument {m['argument'] / GIB:.2f}, temp {m['temp'] / GIB:.2f},"
        f" alias {m['alias'] / GIB:.2f}, peak {m['peak'] / GIB:.2f} GiB{hbm}",
        f"  compiled matmul {r['compiled_matmul_flops_per_device'] / 1e12:.3f} TFLOP per device per step"
        f" ({r['compiled_matmul_flops_per_device'] * r['num_devices'] / r['global_batch'] / 1e9:.1f} GFLOP per image);"
        " collectives: "
        + (
            ", ".join(f"{k} {v['bytes'] / GIB:.2f} GiB" for k, v in r["collectives_per_device"].items() if v["bytes"])
            or "none"
        ),
    ]
    if "roofline" in r:
        rl = r["roofline"]
        lines.append(
            f"  roofline: step >= {rl['step_s_lower_bound'] * 1e3:.1f} ms ({rl['bound_by']}-bound),"
            f" <= {rl['images_per_s_upper_bound']:.0f} images/s"
        )
    if "timing" in r:
        t = r["timing"]
        lines.append(
            f"  timed here: median {t['step_s_median'] * 1e3:.1f} ms per step (min {t['step_s_min'] * 1e3:.1f}),"
            f" {t['images_per_s']:.1f} images/s over {t['steps']} steps"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cfg: ml_collections.ConfigDict = f.config
    vit = recipe.model_config(f.backbone).backbone
    unknown = [m for m in f.adapt if m not in ("full", "lora", "bitfit")]
    if unknown:
        raise app.UsageError(f"--adapt: {unknown} are not fine-tuning modes (full, lora, bitfit)")
    try:
        topo = topology_lib.get_topology(f.topology)
    except (ValueError, RuntimeError) as e:
        raise app.UsageError(str(e)) from None
    if f.steps and topo.platform == "tpu" and jax.default_backend() != "tpu":
        raise app.UsageError("--steps runs the step: it needs the devices present (--topology=local)")
    out: dict[str, Any] = {}
    for mode in f.adapt:
        run = lambda b, mode=mode: measure(cfg, vit, mode, topo, b, f.steps, f.warmup)
        if not f.max_batch:
            out[mode] = run(f.per_device_batch)
            print(format_report(out[mode]), flush=True)
            continue
        out[mode] = compile_check.max_batch_search(run, f.per_device_batch, topo.device_kind, format_report)
        print(f"adapt={mode}: largest per-device batch that fits: {out[mode]['max_per_device_batch']}", flush=True)
    if f.out:
        pathlib.Path(f.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    cli.run(main, default_config=DEFAULT_CONFIG)
