"""Throughput of downstream evaluation: frozen-feature extraction and head training, as used by evaluate.

Three figures, each compiled ahead of time, warmed up, then timed --iters times (median):
  features   the frozen backbone producing GLoRI's inputs (last-4-block patch and class tokens):
             images/s (the cost of prediction and of every training step)
  heads      one HeadBank update of --heads heads (the lr grid) on precomputed features: steps/s
  step       the full training step (backbone forward + all heads): steps/s and images/s

Weights are random; timings do not depend on their values. Usage from the repository root:
    python -m bench.eval_throughput --arch=vit_large --resolution=512 --batch=2 --dtype=float32
    python -m bench.eval_throughput --batch=64 --dtype=bfloat16 --heads=13   # an accelerator
Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization
from chexfound_jax.models.build import init_random
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.models.vit import ARCHS, vit_config
from chexfound_jax.parallel.mesh import create_mesh

_ARCH = flags.DEFINE_enum("arch", "vit_large", sorted(ARCHS), "Backbone size.")
_RES = flags.DEFINE_integer("resolution", 512, "Input height = width (also the stored position grid).")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per step (global, over all local devices).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Backbone compute dtype.")
_HEAD = flags.DEFINE_enum("head", "glori", ["glori", "linear"], "Head kind.")
_HEADS = flags.DEFINE_integer("heads", 13, "Heads trained at once (the official lr grid has 13).")
_CLASSES = flags.DEFINE_integer("classes", 40, "Classes (CXR-LT: 40).")
_CAT_CLS = flags.DEFINE_bool("cat_cls", True, "GLoRI --cat-cls.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed iterations after compilation.")
_ONLY = flags.DEFINE_list("only", ["features", "heads", "step"], "Which figures to measure.")


def timed(fn, *args) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of a jitted fn."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(_WARMUP.value):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main(argv):
    del argv
    cfg = vit_config(_ARCH.value, img_size=_RES.value, dtype=_DTYPE.value)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}")
    print(
        f"backbone {_ARCH.value}/{cfg.patch_size} @ {_RES.value}, {_DTYPE.value}; batch {_BATCH.value}; "
        f"{_HEADS.value} {_HEAD.value} heads, {_CLASSES.value} classes"
    )
    mesh = create_mesh({"data": -1})
    _, state = init_random(cfg, 0)
    params = nnx.to_pure_dict(state)
    features = FrozenFeatures(cfg, jax.tree.map(np.asarray, params), 4, _DTYPE.value)
    backbone = features.state
    head_cfg = ClassifierConfig(
        kind=_HEAD.value, num_classes=_CLASSES.value, embed_dim=cfg.embed_dim, cat_cls=_CAT_CLS.value
    )
    lrs = tuple(np.geomspace(1e-5, 0.1, _HEADS.value).tolist())
    bank = HeadBank(head_cfg, Optimization(lrs), features, mesh)
    rng = np.random.default_rng(0)
    images = jax.device_put(
        rng.standard_normal((_BATCH.value, _RES.value, _RES.value, 3), np.float32), bank.batch_sharding
    )
    labels = jax.device_put((rng.random((_BATCH.value, _CLASSES.value)) < 0.1).astype(np.float32), bank.batch_sharding)
    b = _BATCH.value
    if "features" in _ONLY.value:
        c, s = timed(jax.jit(features.__call__), backbone, images)
        print(f"features: {b / s:.2f} images/s ({s * 1e3:.1f} ms per batch; compile {c:.1f} s)")
    if "heads" in _ONLY.value or "step" in _ONLY.value:
        state_bank = bank.init(0, 10_000)
    if "heads" in _ONLY.value:
        feats = jax.jit(features.__call__)(backbone, images)
        head_only = HeadBank(head_cfg, Optimization(lrs), features, mesh)
        head_only.features = lambda _, f: f  # the bank on precomputed features
        step = jax.jit(head_only._train_step)
        c, s = timed(step, state_bank, None, {"image": feats, "labels": labels}, jax.random.key(0))
        print(f"heads: {1 / s:.2f} steps/s of {_HEADS.value} heads ({s * 1e3:.1f} ms; compile {c:.1f} s)")
    if "step" in _ONLY.value:
        step = jax.jit(bank._train_step)
        c, s = timed(step, state_bank, backbone, {"image": images, "labels": labels}, jax.random.key(0))
        print(f"step: {1 / s:.3f} steps/s, {b / s:.2f} images/s ({s * 1e3:.1f} ms; compile {c:.1f} s)")


if __name__ == "__main__":
    app.run(main)
