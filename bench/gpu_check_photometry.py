"""The finish_on_device section of bench.gpu_check: the on-device photometry on a pipeline batch, with copies of the
pipeline's per-example and grouping steps for an image without grain or tensorflow_datasets; apart from the model."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from bench.gpu_check_report import error_text

if TYPE_CHECKING:
    from bench.gpu_check import Check, Options


PARAM_PREFIX = "aug_"  # chexfound_jax.data.pipeline.PARAM_PREFIX


def load_pipeline() -> tuple[Any, str | None]:
    """(chexfound_jax.data.pipeline, None), or (None, why) where it cannot be imported: it pulls in
    grain, tensorflow_datasets and array_record (for reading shards), which an accelerator image may lack."""
    try:
        from chexfound_jax.data import pipeline

        return pipeline, None
    except ImportError as e:
        return None, error_text(e)


def synthetic_xray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A uint8 gray image shaped like a prepared record (shorter side `size`, portrait)."""
    height = size + int(rng.integers(0, size // 4 + 1))
    ramp = np.linspace(40, 200, height, dtype=np.float32)[:, None]
    return np.clip(ramp + rng.normal(0, 25, (height, size)), 0, 255).astype(np.uint8)


def _example(element: dict, rng: np.random.Generator, aug: Any) -> dict:
    """pipeline._example with photometric="device", for when the pipeline module is not importable."""
    from chexfound_jax.data import augment

    crops = augment.multi_crop(element["image"], rng, aug)
    out = {"record": element["record"], "skipped": element["skipped"], "mask_seed": rng.integers(2**63)}
    for kind in ("global", "local"):
        out[f"{kind}_crops"] = crops[f"{kind}_crops"]
        out.update({f"{PARAM_PREFIX}{kind}_{k}": v for k, v in crops[f"{kind}_params"].items()})
    return out


def _group(examples: list[dict], cfg: Any) -> dict:
    """pipeline._group (crop-major crops and parameters, the group's iBOT masks), likewise."""
    from chexfound_jax.data import batch_layout
    from chexfound_jax.ssl import masking

    stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    crop_major = lambda x: np.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
    out = {k: crop_major(v) for k, v in stacked.items() if k not in ("record", "skipped", "mask_seed")}
    two_b = out["global_crops"].shape[0]
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    masks = masking.collate_masks(
        np.random.default_rng(stacked["mask_seed"].astype(np.uint64).tolist()),
        two_b,
        (grid, grid),
        mask_ratio=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        max_masked_tokens=batch_layout.max_masked_tokens(cfg, two_b // 2),
    )
    out |= {k: masks[k] for k in ("masks", "mask_indices", "mask_weights", "mask_valid")}
    out["skipped"] = np.int32(stacked["skipped"].sum())
    out["record_index"] = stacked["record"].astype(np.int64)
    return out


def _finish(batch: dict, cfg: Any) -> dict:
    """pipeline.finish_on_device for uint8 crops (the photometric ops under jit), likewise."""
    import jax.numpy as jnp

    from chexfound_jax.data import augment, batch_layout

    aug = augment.AugmentConfig.from_config(cfg)
    out = {k: batch[k] for k in batch_layout.BATCH_KEYS}
    for kind in ("global", "local"):
        prefix = f"{PARAM_PREFIX}{kind}_"
        params = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
        out[f"{kind}_crops"] = augment.photometric(batch[f"{kind}_crops"], params, aug, xp=jnp)
    return out


def pipeline_batch(
    cfg: Any, images: int, rng: np.random.Generator, pipeline: Any = None
) -> tuple[dict[str, np.ndarray], float]:
    """One group of `images` synthetic X-ray-sized images through the pipeline's per-example step (multi-crop
    geometry + photometric draws, photometric="device") and grouping step (crop-major layout, iBOT masks):
    the batch `finish_on_device` gets, with its group axis. `pipeline`: the module, or None for this file's
    copies of those two steps. Returns (batch, host seconds)."""
    from chexfound_jax.data import augment

    aug = augment.AugmentConfig.from_config(cfg)
    example = (
        (lambda e, r: pipeline._example(e, r, aug, on_host=False)) if pipeline else (lambda e, r: _example(e, r, aug))
    )
    group = pipeline._group if pipeline else _group
    t0 = time.perf_counter()
    examples = []
    for record in range(images):
        element = {"image": synthetic_xray(rng, cfg.crops.global_crops_size), "record": record, "skipped": 0}
        examples.append(example(element, rng))
    batch = {k: np.asarray(v)[None] for k, v in group(examples, cfg).items()}  # one group
    return batch, time.perf_counter() - t0


def finish_on_device(
    check: Check, deadline: float, out: dict, cfg: Any, devices: list[jax.Device], options: Options
) -> None:
    from chexfound_jax.data import batch_layout

    pipeline, why = load_pipeline()
    out["via"] = "pipeline.finish_on_device" if pipeline else f"bench.gpu_check copies of the pipeline steps ({why})"
    finish = pipeline.finish_on_device if pipeline else _finish
    device = devices[0]
    images = options.fod_images
    batch, host_s = pipeline_batch(cfg, images, np.random.default_rng(0), pipeline)
    keys = [k for k in batch if k in batch_layout.BATCH_KEYS or k.startswith(PARAM_PREFIX)]
    arrays = jax.device_put({k: batch[k] for k in keys}, device)
    fn = jax.jit(lambda b: finish(b, cfg))
    t0 = time.perf_counter()
    compiled = fn.lower(arrays).compile()
    compile_s = time.perf_counter() - t0
    out_batch = jax.block_until_ready(compiled(arrays))
    times = []
    for _ in range(options.fod_repeats):
        if times and check.now() > deadline:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(arrays))
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out.update(
        {
            "images": images,
            "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "input_bytes": int(sum(np.asarray(batch[k]).nbytes for k in keys)),
            "output_shapes": {k: list(v.shape) for k, v in out_batch.items() if k.endswith("_crops")},
            "host_build_ms_per_image": 1e3 * host_s / images,
            "compile_s": round(compile_s, 2),
            "batch_ms": step * 1e3,
            "batch_ms_min": min(times) * 1e3,
            "repeats": len(times),
            "ms_per_image": 1e3 * step / images,
            "images_per_s": images / step,
        }
    )
    print(
        f"finish_on_device: {out['ms_per_image']:.3f} ms per image ({images} images,"
        f" {out['batch_ms']:.2f} ms per batch, compile {compile_s:.1f} s); host crops"
        f" {out['host_build_ms_per_image']:.1f} ms per image",
        flush=True,
    )
