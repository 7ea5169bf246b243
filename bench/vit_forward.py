"""Throughput of the backbone forward (`VisionTransformer.forward_features`), in images/s and TFLOP/s.

The forward is jitted with the parameters as an explicit argument (nnx.split / nnx.merge), so
they are device buffers rather than baked-in constants. It is compiled ahead of time (the
compile time is printed), run --warmup times, then timed --iters times, each call waited on with
block_until_ready; the median is reported. TFLOP/s uses the analytic matmul FLOPs of
chexfound_jax.models.flops, the model FLOPs of MFU accounting, not XLA's count. Weights are
random (chexfound_jax.models.build.init_random); timings do not depend on their values.

Usage, from the repository root (or with the package installed, `python bench/vit_forward.py`):
    python -m bench.vit_forward --resolution=224 --batch=2 --dtype=float32
    python -m bench.vit_forward --resolution=512 --batch=32 --dtype=bfloat16 --attention_impl=cudnn

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from bench import timing
from chexfound_jax.models.build import init_random
from chexfound_jax.models.flops import vit_forward_flops
from chexfound_jax.models.vit import ARCHS, count_params, vit_config

_ARCH = flags.DEFINE_enum("arch", "vit_large", sorted(ARCHS), "Backbone size.")
_PATCH = flags.DEFINE_integer("patch_size", 16, "Patch size.")
_IMG = flags.DEFINE_integer("img_size", 512, "Size the stored position embedding is made for.")
_RES = flags.DEFINE_integer("resolution", None, "Input height = width; default --img_size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per forward call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
_ATTN = flags.DEFINE_enum(
    "attention_impl", "none", ["none", "xla", "cudnn"], "jax.nn.dot_product_attention implementation."
)
_FFN = flags.DEFINE_enum("ffn_layer", "swiglufused", ["swiglufused", "mlp"], "FFN type.")
_REGS = flags.DEFINE_integer("num_register_tokens", 4, "Register tokens.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block (no effect on a pure forward's FLOPs).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed iterations after compilation.")
_SEED = flags.DEFINE_integer("seed", 0, "Weight and input seed.")


def main(argv):
    del argv
    resolution = _RES.value or _IMG.value
    cfg = vit_config(
        _ARCH.value,
        patch_size=_PATCH.value,
        img_size=_IMG.value,
        ffn_layer=_FFN.value,
        num_register_tokens=_REGS.value,
        dtype=_DTYPE.value,
        attention_impl=None if _ATTN.value == "none" else _ATTN.value,
        remat=_REMAT.value,
    )
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s), using 1)")
    print(f"jax {jax.__version__}")
    print(
        f"config: {_ARCH.value}/{cfg.patch_size} reg{cfg.num_register_tokens} {cfg.ffn_layer} (hidden {cfg.hidden_dim})"
        f" pos-embed {cfg.img_size} input {resolution}x{resolution} batch {_BATCH.value} dtype {cfg.dtype}"
        f" attention {_ATTN.value} remat {cfg.remat}"
    )

    t0 = time.perf_counter()
    graphdef, state = init_random(cfg, _SEED.value)
    params_m = count_params(nnx.to_pure_dict(state)) / 1e6
    print(f"params: {params_m:.1f} M, initialised in {time.perf_counter() - t0:.1f} s")

    x = jax.random.normal(jax.random.key(_SEED.value + 1), (_BATCH.value, resolution, resolution, 3), jnp.float32)

    def forward(state, x):
        return nnx.merge(graphdef, state).forward_features(x)

    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    print(f"compile: {compile_s:.1f} s")

    times = timing.time_calls(compiled, (state, x), _WARMUP.value, _ITERS.value)

    step = statistics.median(times)
    flops = vit_forward_flops(cfg, resolution)
    images_per_s = _BATCH.value / step
    print(f"model FLOPs per image: {flops / 1e9:.1f} GFLOP")
    print(
        f"step time: median {step * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
        f" over {len(times)} iterations"
    )
    print(f"images/s: {images_per_s:.2f}")
    print(f"TFLOP/s: {flops * images_per_s / 1e12:.3f}")


if __name__ == "__main__":
    app.run(main)
