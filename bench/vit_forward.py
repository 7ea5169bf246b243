"""Throughput of the backbone forward (`VisionTransformer.forward_features`), in images/s and TFLOP/s.

The forward is jitted with the parameters as an explicit argument (nnx.split / nnx.merge), so
they are device buffers rather than baked-in constants. It is compiled ahead of time (the
compile time is printed), run --warmup times, then timed --iters times, each call waited on with
block_until_ready; the median is reported. TFLOP/s uses the analytic matmul FLOPs of
chexfound_jax.models.flops, the model FLOPs of MFU accounting, not XLA's count. Weights are
random (chexfound_jax.models.build.init_random); timings do not depend on their values.

Usage, from the repository root (or with the package installed, `python bench/vit_forward.py`):
    python -m bench.vit_forward --image_size=224 --batch_size=2 --dtype=float32
    python -m bench.vit_forward --image_size=512 --batch_size=32 --dtype=bfloat16 --attention_impl=cudnn

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
from chexfound_jax import cli
from chexfound_jax.models.build import init_random
from chexfound_jax.models.flops import vit_forward_flops
from chexfound_jax.models.vit import ARCHS, count_params, vit_config
from data_prep import retired_flags

# old flag -> new (data_prep.retired_flags)
RENAMED = {"resolution": "image_size", "img_size": "pos_embed_size", "batch": "batch_size"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("arch", "vit_large", sorted(ARCHS), "Backbone size.", **fv)
    flags.DEFINE_integer("patch_size", 16, "Patch size.", **fv)
    flags.DEFINE_integer("pos_embed_size", 512, "Image size the stored position embedding is made for.", **fv)
    flags.DEFINE_integer("image_size", None, "Input height = width; default --pos_embed_size.", **fv)
    flags.DEFINE_integer("batch_size", 8, "Images per forward call.", lower_bound=1, **fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).", **fv)
    flags.DEFINE_enum(
        "attention_impl", "none", ["none", "xla", "cudnn"], "jax.nn.dot_product_attention implementation.", **fv
    )
    flags.DEFINE_enum("ffn_layer", "swiglufused", ["swiglufused", "mlp"], "FFN type.", **fv)
    flags.DEFINE_integer("num_register_tokens", 4, "Register tokens.", **fv)
    flags.DEFINE_bool("remat", False, "Rematerialise each block (no effect on a pure forward's FLOPs).", **fv)
    flags.DEFINE_integer("iters", 10, "Timed iterations.", lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed iterations after compilation.", lower_bound=0, **fv)
    flags.DEFINE_integer("seed", 0, "Weight and input seed.", **fv)
    for old, new in RENAMED.items():
        retired_flags.define_renamed(old, new, flag_values=flag_values)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    image_size, batch_size = f.image_size or f.pos_embed_size, f.batch_size
    cfg = vit_config(
        f.arch,
        patch_size=f.patch_size,
        img_size=f.pos_embed_size,
        ffn_layer=f.ffn_layer,
        num_register_tokens=f.num_register_tokens,
        dtype=f.dtype,
        attention_impl=None if f.attention_impl == "none" else f.attention_impl,
        remat=f.remat,
    )
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s), using 1)")
    print(f"jax {jax.__version__}")
    print(
        f"config: {f.arch}/{cfg.patch_size} reg{cfg.num_register_tokens} {cfg.ffn_layer} (hidden {cfg.hidden_dim})"
        f" pos-embed {cfg.img_size} input {image_size}x{image_size} batch {batch_size} dtype {cfg.dtype}"
        f" attention {f.attention_impl} remat {cfg.remat}"
    )

    t0 = time.perf_counter()
    graphdef, state = init_random(cfg, f.seed)
    params_m = count_params(nnx.to_pure_dict(state)) / 1e6
    print(f"params: {params_m:.1f} M, initialised in {time.perf_counter() - t0:.1f} s")

    x = jax.random.normal(jax.random.key(f.seed + 1), (batch_size, image_size, image_size, 3), jnp.float32)

    def forward(state, x):
        return nnx.merge(graphdef, state).forward_features(x)

    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    print(f"compile: {compile_s:.1f} s")

    times = timing.time_calls(compiled, (state, x), f.warmup, f.iters)

    step = statistics.median(times)
    flops = vit_forward_flops(cfg, image_size)
    images_per_s = batch_size / step
    print(f"model FLOPs per image: {flops / 1e9:.1f} GFLOP")
    print(
        f"step time: median {step * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
        f" over {len(times)} iterations"
    )
    print(f"images/s: {images_per_s:.2f}")
    print(f"TFLOP/s: {flops * images_per_s / 1e12:.3f}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
