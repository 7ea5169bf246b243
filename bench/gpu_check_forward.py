"""The vit_forward section of bench.gpu_check: the backbone forward in bf16 per attention implementation, a module of
its own as the one section that times the model without the training step."""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

import jax

from bench import timing
from bench.gpu_check_report import _failed, _run_line
from chexfound_jax import hardware

if TYPE_CHECKING:
    from bench.gpu_check import Check, Options


def vit_forward(
    check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], options: Options
) -> None:
    """The config's backbone forward (forward_features) in bf16 at its global crop size, per attention impl."""
    from flax import nnx

    from chexfound_jax.models.build import init_random
    from chexfound_jax.models.flops import vit_forward_flops
    from chexfound_jax.train import recipe

    device = devices[0]
    batch, resolution = options.forward_batch, cfg.crops.global_crops_size
    impls = ["cudnn", "xla"] if device.platform == "gpu" else ["xla"]
    base = recipe.backbone_config(cfg).replace(dtype="bfloat16", drop_path_rate=0.0, remat=False)
    flops = vit_forward_flops(base, resolution)
    peak = hardware.peak_flops(device.device_kind)
    out.update(
        {
            "model": f"{cfg.model.arch}/{base.patch_size} reg{base.num_register_tokens} {base.ffn_layer}"
            f" (embed {base.embed_dim}, depth {base.depth})",
            "resolution": resolution,
            "batch": batch,
            "dtype": "bfloat16",
            "gflop_per_image": flops / 1e9,
            "runs": [],
        }
    )
    graphdef = params = None
    for impl in impls:
        if check.now() + 20 > deadline and out["runs"]:
            out["runs"].append({"attention_impl": impl, "status": "skipped: time budget"})
            continue
        run: dict[str, Any] = {"attention_impl": impl, "status": "ok"}
        try:
            vit_cfg = base.replace(attention_impl=impl)
            with jax.default_device(device):
                if params is None:
                    t0 = time.perf_counter()
                    graphdef, params = init_random(vit_cfg, 0)
                    out["init_s"] = round(time.perf_counter() - t0, 2)
                else:  # same parameters, another attention: only the graph's config differs
                    graphdef, _ = nnx.split(nnx.eval_shape(lambda c=vit_cfg: _vit(c)))
                x = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, 3), jax.numpy.float32)

            def forward(state, x, graphdef=graphdef):
                return nnx.merge(graphdef, state).forward_features(x)

            t0 = time.perf_counter()
            compiled = jax.jit(forward).lower(params, x).compile()
            run["compile_s"] = round(time.perf_counter() - t0, 2)
            times = timing.time_calls(compiled, (params, x), options.warmup, options.forward_iters)
            step = statistics.median(times)
            run.update(
                step_ms=step * 1e3,
                step_ms_min=min(times) * 1e3,
                iters=len(times),
                images_per_s=batch / step,
                tflops=flops * batch / step / 1e12,
            )
            if peak:
                run["mfu_pct"] = 100 * flops * batch / step / peak
            del compiled, x
        except Exception as e:
            run.update(_failed(e))
        out["runs"].append(run)
        check.save()
        print(f"forward {impl}: {_run_line(run)}", flush=True)
    del params
    gc.collect()


def _vit(cfg: Any) -> Any:
    from flax import nnx

    from chexfound_jax.models.vit import VisionTransformer

    return VisionTransformer(cfg, rngs=nnx.Rngs(0))
