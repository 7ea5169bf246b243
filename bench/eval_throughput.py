"""Throughput of downstream evaluation: frozen-feature extraction and head training, as used by evaluate.

Three figures, each compiled ahead of time, warmed up, then timed --iters times (median):
  features   the frozen backbone producing GLoRI's inputs (last-4-block patch and class tokens):
             images/s (the cost of prediction and of every training step)
  heads      one HeadBank update of --num_lrs heads (one per learning rate) on precomputed features: steps/s
  step       the full training step (backbone forward + all heads): steps/s and images/s

Weights are random; timings do not depend on their values. Usage from the repository root:
    python -m bench.eval_throughput --arch=vit_large --image_size=512 --batch_size=2 --dtype=float32
    python -m bench.eval_throughput --batch_size=64 --dtype=bfloat16 --num_lrs=13   # an accelerator
Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from bench import timing
from chexfound_jax import cli
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization
from chexfound_jax.models.build import init_random
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.models.vit import ARCHS, vit_config
from chexfound_jax.parallel.mesh import create_mesh
from data_prep import retired_flags

# old flag -> new (data_prep.retired_flags)
RENAMED = {"resolution": "image_size", "batch": "batch_size", "heads": "num_lrs", "classes": "num_classes"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("arch", "vit_large", sorted(ARCHS), "Backbone size.", **fv)
    flags.DEFINE_integer("image_size", 512, "Input height = width (also the stored position grid).", **fv)
    flags.DEFINE_integer("batch_size", 2, "Images per step (global, over all local devices).", lower_bound=1, **fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone compute dtype.", **fv)
    flags.DEFINE_enum("head", "glori", ["glori", "linear"], "Head kind.", **fv)
    flags.DEFINE_integer("num_lrs", 13, "Learning rates, one head each, trained at once (official grid: 13).", **fv)
    flags.DEFINE_integer("num_classes", 40, "Classes (CXR-LT: 40).", lower_bound=1, **fv)
    flags.DEFINE_bool("cat_cls", True, "GLoRI --cat-cls.", **fv)
    flags.DEFINE_integer("iters", 5, "Timed iterations.", lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", 1, "Untimed iterations after compilation.", lower_bound=0, **fv)
    flags.DEFINE_list("only", ["features", "heads", "step"], "Which figures to measure.", **fv)
    for old, new in RENAMED.items():
        retired_flags.define_renamed(old, new, flag_values=flag_values)


def timed(fn, args: tuple, warmup: int, iters: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of a jitted fn."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, statistics.median(timing.time_calls(compiled, args, warmup, iters))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    b, size, only = f.batch_size, f.image_size, f.only
    cfg = vit_config(f.arch, img_size=size, dtype=f.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}")
    print(
        f"backbone {f.arch}/{cfg.patch_size} @ {size}, {f.dtype}; batch {b}; "
        f"{f.num_lrs} {f.head} heads, {f.num_classes} classes"
    )
    mesh = create_mesh({"data": -1})
    _, state = init_random(cfg, 0)
    params = nnx.to_pure_dict(state)
    features = FrozenFeatures(cfg, jax.tree.map(np.asarray, params), 4, f.dtype)
    backbone = features.state
    head_cfg = ClassifierConfig(kind=f.head, num_classes=f.num_classes, embed_dim=cfg.embed_dim, cat_cls=f.cat_cls)
    lrs = tuple(np.geomspace(1e-5, 0.1, f.num_lrs).tolist())
    bank = HeadBank(head_cfg, Optimization(lrs), features, mesh)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.standard_normal((b, size, size, 3), np.float32), bank.batch_sharding)
    labels = jax.device_put((rng.random((b, f.num_classes)) < 0.1).astype(np.float32), bank.batch_sharding)
    loops = (f.warmup, f.iters)
    if "features" in only:
        c, s = timed(jax.jit(features.__call__), (backbone, images), *loops)
        print(f"features: {b / s:.2f} images/s ({s * 1e3:.1f} ms per batch; compile {c:.1f} s)")
    if "heads" in only or "step" in only:
        state_bank = bank.init(0, 10_000)
    if "heads" in only:
        feats = jax.jit(features.__call__)(backbone, images)
        head_only = HeadBank(head_cfg, Optimization(lrs), features, mesh)
        head_only.features = lambda _, x: x  # the bank on precomputed features
        step = jax.jit(head_only._train_step)
        c, s = timed(step, (state_bank, None, {"image": feats, "labels": labels}, jax.random.key(0)), *loops)
        print(f"heads: {1 / s:.2f} steps/s of {f.num_lrs} heads ({s * 1e3:.1f} ms; compile {c:.1f} s)")
    if "step" in only:
        step = jax.jit(bank._train_step)
        c, s = timed(step, (state_bank, backbone, {"image": images, "labels": labels}, jax.random.key(0)), *loops)
        print(f"step: {1 / s:.3f} steps/s, {b / s:.2f} images/s ({s * 1e3:.1f} ms; compile {c:.1f} s)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
