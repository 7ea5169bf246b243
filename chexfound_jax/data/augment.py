"""DINOv2 / CheXFound multi-crop pretraining augmentation for single-channel chest X-rays (official augmentations.py).

The work is split in two on purpose:

- ``geometric`` (host, NumPy + PIL): RandomResizedCrop with bicubic resampling and the horizontal flip.
  Cropping and resampling are cheap on the host and need PIL's antialiasing filters, which is what
  torchvision applies to PIL images.
- ``photometric`` (array-generic, ``xp=numpy`` or ``xp=jax.numpy`` under ``jax.jit``): colour jitter,
  Gaussian blur, solarisation, scaling to [0, 1], replication to 3 channels and ImageNet normalisation.
  Its random draws are made on the host by ``photometric_params`` as fixed-shape arrays (one entry per
  crop), so the ops can run in the data workers or on the accelerator with the same numbers.

What is left out, and why: the pipeline works on the gray level only, because CheXFound decodes X-rays
with ``.convert("RGB")``, so all 3 channels are equal. On such an image ColorJitter's saturation
(blend with the image's own luma), hue (a hue shift at zero saturation) and RandomGrayscale (luma,
then replicate) are exact no-ops in PIL: luma weights 19595 + 38470 + 7471 = 2^16, so L of (v, v, v)
is v exactly. They only consumed random numbers, so they are skipped. Only brightness and contrast
act, and of ColorJitter's random permutation of 4 ops only their relative order matters
(``brightness_first``, p = 0.5).

Blur probabilities are the *effective* ones (0.0 / 0.9 / 0.5 for global 1 / global 2 / locals). The
upstream GaussianBlur wrapper passes 1 - p to RandomApply, and released models were trained that way.

Quantisation (``AugmentConfig.quantize``, default True): torchvision runs every op on a PIL uint8
image, so values are re-quantised after each op. With ``quantize`` on, that is reproduced:
brightness and contrast are PIL's ``Image.blend`` in float32, truncated to an integer and clipped.
The contrast mean is the image mean rounded to an integer, as ``ImageEnhance.Contrast`` takes it.
The blur is rounded half-to-even, as torchvision does after its float conv. Jitter and solarize then
equal PIL bit for bit. The blur can differ by one level where the float sum falls within rounding
error of .5 (a different summation order than torch's conv2d). With ``quantize`` off, the same ops
run on continuous values, clipped to [0, 255] after each op. The two differ by a few gray levels
at most (bounded in the tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from chexfound_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

PARAM_KEYS: tuple[str, ...] = ("jitter", "brightness", "contrast", "brightness_first", "blur", "sigma", "solarize")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Crop geometry (normally from ``cfg.crops``) and the fixed DINOv2 probabilities.

    ``global_blur_p`` and ``global_solarize_p`` hold one probability per global crop, so their
    length is the number of global crops (2).
    """

    global_crops_size: int = 512
    local_crops_size: int = 144
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor ~ U(1 - 0.4, 1 + 0.4)
    contrast: float = 0.4
    global_blur_p: tuple[float, ...] = (0.0, 0.9)  # effective values (upstream 1 - p quirk)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_solarize_p: float = 0.0
    solarize_threshold: int = 128
    quantize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if len(self.global_blur_p) != len(self.global_solarize_p):
            raise ValueError("global_blur_p and global_solarize_p need one entry per global crop")
        if self.blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")

    @property
    def n_global(self) -> int:
        return len(self.global_blur_p)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> AugmentConfig:
        """Sizes, scales and the local crop count from ``cfg.crops`` (ml_collections); the rest default."""
        crops = cfg.crops
        fields = dict(
            global_crops_size=int(crops.global_crops_size),
            local_crops_size=int(crops.local_crops_size),
            local_crops_number=int(crops.local_crops_number),
            global_crops_scale=tuple(float(s) for s in crops.global_crops_scale),
            local_crops_scale=tuple(float(s) for s in crops.local_crops_scale),
        )
        fields.update(overrides)
        return cls(**fields)


# ----------------------------------------------------------------------------------------------------
# Host part: geometry (NumPy + PIL)
# ----------------------------------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A (H, W) or (H, W, 1) uint8/uint16 record -> (H, W) uint8; uint16 becomes round(x / 257).

    The released model was trained on 8-bit images, so 16-bit records are reduced the same way first.
    (x + 128) // 257 equals round(x / 257) exactly: x / 257 is never a half-integer.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise TypeError(f"expected uint8 or uint16 pixels, got {image.dtype}")


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) of the crop.

    The algorithm is the same: up to 10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio),
    with Python rounding, and uniform inclusive offsets. If all tries fail, a central crop with the
    aspect clamped to ``ratio``. Only the random source differs: numpy's Generator in float64, where
    torch draws float32 uniforms and ``torch.randint``. The distributions are the same, the bit
    streams are not.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crops(
    img: Image.Image,
    rng: np.random.Generator,
    n: int,
    size: int,
    scale: tuple[float, float],
    cfg: AugmentConfig,
) -> np.ndarray:
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        top, left, h, w = random_resized_crop_box(rng, img.height, img.width, scale, cfg.ratio)
        # crop, then resize, as torchvision's resized_crop does. resize(box=...) would let the filter
        # read pixels outside the box at its edges, which gives up to 1 level of difference there.
        crop = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC))
        out[i] = crop[:, ::-1] if rng.random() < cfg.flip_p else crop
    return out


def geometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (global crops (n_global, S, S), local crops (n_local, s, s)), both uint8.

    Draw order, per crop, globals then locals: the box (``random_resized_crop_box``), then the flip
    (``rng.random() < flip_p``).
    """
    img = Image.fromarray(to_uint8(image))
    global_crops = _crops(img, rng, cfg.n_global, cfg.global_crops_size, cfg.global_crops_scale, cfg)
    local_crops = _crops(img, rng, cfg.local_crops_number, cfg.local_crops_size, cfg.local_crops_scale, cfg)
    return global_crops, local_crops


def photometric_params(
    rng: np.random.Generator, n_global: int, n_local: int, cfg: AugmentConfig
) -> dict[str, np.ndarray]:
    """The random draws of the photometric ops: a dict of (n_global + n_local,) arrays, globals first.

    Keys: ``jitter`` (bool, p = jitter_p), ``brightness`` / ``contrast`` (float32 factors ~ U(1 +- 0.4),
    drawn even when jitter is off so shapes stay fixed), ``brightness_first`` (bool, the jitter order),
    ``blur`` (bool, p by crop kind), ``sigma`` (float32 ~ U(0.1, 2.0)), ``solarize`` (bool, p by crop
    kind). Use ``split_params`` to get the global and local halves.
    """
    if n_global > cfg.n_global:
        raise ValueError(f"the config has blur/solarize probabilities for {cfg.n_global} global crops, not {n_global}")
    n = n_global + n_local
    blur_p = np.array([*cfg.global_blur_p[:n_global], *[cfg.local_blur_p] * n_local], np.float64)
    solarize_p = np.array([*cfg.global_solarize_p[:n_global], *[cfg.local_solarize_p] * n_local], np.float64)
    return {
        "jitter": rng.random(n) < cfg.jitter_p,
        "brightness": rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, n).astype(np.float32),
        "contrast": rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, n).astype(np.float32),
        "brightness_first": rng.random(n) < 0.5,
        "blur": rng.random(n) < blur_p,
        "sigma": rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], n).astype(np.float32),
        "solarize": rng.random(n) < solarize_p,
    }


def split_params(params: Mapping[str, Any], n_global: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``photometric_params`` output along its last axis into (global params, local params)."""
    return {k: v[..., :n_global] for k, v in params.items()}, {k: v[..., n_global:] for k, v in params.items()}


# ----------------------------------------------------------------------------------------------------
# Photometric part: array-generic (numpy or jax.numpy)
# ----------------------------------------------------------------------------------------------------


def _expand(p: Any, xp: Any) -> Any:
    """(...,) per-crop values -> (..., 1, 1), to broadcast over (..., H, W)."""
    return xp.asarray(p)[..., None, None]


def _quantize_blend(x: Any, cfg: AugmentConfig, xp: Any) -> Any:
    """PIL's Image.blend storage: truncate the float32 value to an integer, clip to [0, 255]."""
    if cfg.quantize:
        x = xp.floor(x)
    return xp.clip(x, 0.0, 255.0)


def adjust_brightness(x: Any, factor: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """ImageEnhance.Brightness: blend with black, i.e. x * f (float32 in [0, 255], (..., H, W))."""
    return _quantize_blend(x * _expand(factor, xp), cfg, xp)


def contrast_mean(x: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """The per-crop gray level that ImageEnhance.Contrast blends with: int(mean + 0.5), shape (...).

    Quantised inputs are integers, so the mean comes from an exact int32 sum (s // n, plus a round-half-up
    test on the remainder). That is exact in numpy and jax alike, and cannot overflow below 2^23 pixels.
    """
    n = x.shape[-1] * x.shape[-2]
    if not cfg.quantize:
        return xp.mean(x, axis=(-2, -1))
    return _round_mean(xp.sum(x.astype(xp.int32), axis=(-2, -1)), n).astype(xp.float32)


def _round_mean(total: Any, n: int) -> Any:
    """floor(total / n + 0.5) for a non-negative integer total, exactly, in integer arithmetic."""
    q, r = total // n, total % n
    return q + (2 * r >= n)


def blend_contrast(x: Any, mean: Any, factor: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """Image.blend with the constant image ``mean``: m + f * (x - m), per crop (mean and f of shape (...))."""
    mean = _expand(mean, xp)
    return _quantize_blend(mean + _expand(factor, xp) * (x - mean), cfg, xp)


def adjust_contrast(x: Any, factor: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """ImageEnhance.Contrast: blend with the per-crop mean gray level (see ``contrast_mean``)."""
    return blend_contrast(x, contrast_mean(x, cfg, xp), factor, cfg, xp)


def color_jitter(x: Any, params: Mapping[str, Any], cfg: AugmentConfig, xp: Any = np) -> Any:
    """Brightness and contrast in the drawn order; a crop without jitter gets factor 1 (an exact identity)."""
    jitter = xp.asarray(params["jitter"])
    one = xp.ones((), xp.float32)
    fb = xp.where(jitter, xp.asarray(params["brightness"], xp.float32), one)
    fc = xp.where(jitter, xp.asarray(params["contrast"], xp.float32), one)
    b_then_c = adjust_contrast(adjust_brightness(x, fb, cfg, xp), fc, cfg, xp)
    c_then_b = adjust_brightness(adjust_contrast(x, fc, cfg, xp), fb, cfg, xp)
    return xp.where(_expand(params["brightness_first"], xp), b_then_c, c_then_b)


def gaussian_kernels(sigma: Any, apply: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """(..., K) 1-D taps: torchvision's kernel (exp(-x^2 / (2 sigma^2)), x = -K//2..K//2, normalised)
    where ``apply``, else the identity (a unit impulse, so "no blur" is exact and shapes stay fixed).
    """
    k = cfg.blur_kernel_size
    half = (k - 1) // 2
    taps = xp.asarray(np.linspace(-half, half, k, dtype=np.float32))
    sigma = xp.asarray(sigma, xp.float32)[..., None]
    pdf = xp.exp(-0.5 * (taps / sigma) ** 2)
    kernel = pdf / xp.sum(pdf, axis=-1, keepdims=True)
    delta = xp.asarray(np.arange(k) == half, xp.float32)
    return xp.where(xp.asarray(apply)[..., None], kernel, delta)


def gaussian_blur(x: Any, kernels: Any, xp: Any = np) -> Any:
    """Separable blur of (..., H, W) with per-crop symmetric (..., K) taps and reflect padding (torch's).

    Padding plus shifted slices: it jits with per-crop kernels and needs no scipy. Mirrored taps are
    summed in pairs (the Gaussian is symmetric), 13 instead of 17 array ops per pass. torchvision
    convolves with the outer product of the same taps, so results agree up to float rounding.
    """
    half = (kernels.shape[-1] - 1) // 2
    taps = kernels[..., None, None, :]  # (..., 1, 1, K)
    lead = [(0, 0)] * (x.ndim - 2)

    def one_pass(z: Any, axis: int) -> Any:
        n = z.shape[axis]
        pad = [*lead, (half, half), (0, 0)] if axis == -2 else [*lead, (0, 0), (half, half)]
        zp = xp.pad(z, pad, mode="reflect")

        def shifted(i: int) -> Any:
            return zp[..., i : i + n, :] if axis == -2 else zp[..., :, i : i + n]

        y = taps[..., half] * shifted(half)
        for i in range(half):
            y = y + taps[..., i] * (shifted(i) + shifted(2 * half - i))
        return y

    return one_pass(one_pass(x, -2), -1)


def solarize(x: Any, apply: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """ImageOps.solarize where ``apply``: x >= threshold -> 255 - x."""
    return xp.where(_expand(apply, xp) & (x >= cfg.solarize_threshold), 255.0 - x, x)


def normalize_rgb(x: Any, cfg: AugmentConfig, xp: Any = np) -> Any:
    """Gray (..., H, W) in [0, 255] -> ToTensor ([0, 1]) -> 3 equal channels -> ImageNet Normalize: (..., H, W, 3)."""
    mean = xp.asarray(np.asarray(cfg.mean, np.float32))
    std = xp.asarray(np.asarray(cfg.std, np.float32))
    return ((x / np.float32(255.0))[..., None] - mean) / std


def _blur_step(x: Any, params: Mapping[str, Any], cfg: AugmentConfig, xp: Any) -> Any:
    if xp is np:
        # On the host, blur only the crops that draw it (10-50% of them); under jit shapes must be fixed.
        flat = x.reshape(-1, *x.shape[-2:])
        idx = np.flatnonzero(np.asarray(params["blur"]).reshape(-1))
        if idx.size:
            kernels = gaussian_kernels(np.asarray(params["sigma"]).reshape(-1)[idx], True, cfg, np)
            blurred = gaussian_blur(flat[idx], kernels, np)
            flat = flat.copy()
            flat[idx] = np.round(blurred) if cfg.quantize else blurred
        return flat.reshape(x.shape)
    y = gaussian_blur(x, gaussian_kernels(params["sigma"], params["blur"], cfg, xp), xp)
    return xp.round(y) if cfg.quantize else y


def intensity(crops: Any, params: Mapping[str, Any], cfg: AugmentConfig, xp: Any = np) -> Any:
    """The gray-level ops in torchvision's order, jitter -> blur -> solarize: uint8 (..., H, W) -> float32 [0, 255]."""
    x = xp.asarray(crops).astype(xp.float32)
    x = color_jitter(x, params, cfg, xp)
    x = _blur_step(x, params, cfg, xp)
    return solarize(x, params["solarize"], cfg, xp)


def photometric(crops: Any, params: Mapping[str, Any], cfg: AugmentConfig, xp: Any = np) -> Any:
    """uint8 crops (..., H, W) with params of leading shape (...) -> normalised float32 (..., H, W, 3).

    Array-generic: ``xp=numpy`` on the host, or ``xp=jax.numpy``, including under ``jax.jit``
    (``cfg`` static, params as arrays). Under jit every op runs on every crop (fixed shapes; both
    jitter orders, then a select), with identity factors/kernels where an op is off. With numpy and
    ``quantize`` on, it takes ``_photometric_host``, which gives the same values bit for bit at a
    fraction of the cost.
    """
    if xp is np and cfg.quantize:
        return _photometric_host(np.asarray(crops), params, cfg)
    return normalize_rgb(intensity(crops, params, cfg, xp), cfg, xp)


def _photometric_host(crops: np.ndarray, params: Mapping[str, Any], cfg: AugmentConfig) -> np.ndarray:
    """The quantised ops per crop, with lookup tables wherever an op is pointwise.

    Between ops every value is one of 256 integer levels. So jitter is a 256-entry table built with
    the same array functions: the contrast mean comes from the histogram, pushed through the
    brightness table when brightness goes first. Solarize plus normalisation is a (256, 3) table. Only
    the blur touches pixels in float, and only on crops that draw it.
    """
    if crops.dtype != np.uint8:
        raise TypeError(f"photometric takes uint8 crops, got {crops.dtype}")
    height, width = crops.shape[-2:]
    flat = crops.reshape(-1, height, width)
    p = {k: np.asarray(params[k]).reshape(-1) for k in PARAM_KEYS}
    levels = np.arange(256, dtype=np.float32)[None, :]  # a 1 x 256 "image" of every level
    norm = normalize_rgb(levels[0], cfg, np)  # (256, 3)
    norm_solarized = normalize_rgb(solarize(levels, True, cfg, np)[0], cfg, np)
    out = np.empty((flat.shape[0], height, width, 3), np.float32)
    for i, x in enumerate(flat):
        if p["jitter"][i]:
            hist = np.bincount(x.ravel(), minlength=256).astype(np.int64)
            fb, fc = p["brightness"][i], p["contrast"][i]
            if p["brightness_first"][i]:
                table = adjust_brightness(levels, fb, cfg)
                table = blend_contrast(table, _table_mean(hist, table), fc, cfg)
            else:
                table = blend_contrast(levels, _table_mean(hist, levels), fc, cfg)
                table = adjust_brightness(table, fb, cfg)
            x = np.take(table[0].astype(np.uint8), x, mode="clip")
        if p["blur"][i]:
            kernel = gaussian_kernels(p["sigma"][i], True, cfg, np)
            x = np.round(gaussian_blur(x.astype(np.float32), kernel, np)).astype(np.uint8)
        np.take(norm_solarized if p["solarize"][i] else norm, x, axis=0, out=out[i], mode="clip")  # "clip": unbuffered
    return out.reshape(*crops.shape, 3)


def _table_mean(hist: np.ndarray, table: np.ndarray) -> np.float32:
    """The contrast mean of an image with histogram ``hist`` after the (1, 256) level table ``table``."""
    return np.float32(_round_mean(int(hist @ table[0].astype(np.int64)), int(hist.sum())))


def multi_crop(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> dict[str, np.ndarray | dict]:
    """The per-example output of the grain map step: uint8 crops plus their photometric draws.

    {"global_crops": (n_global, S, S) uint8, "local_crops": (n_local, s, s) uint8,
     "global_params": {key: (n_global,)}, "local_params": {key: (n_local,)}}. The photometric ops
    are applied later, by ``photometric``, on the host or on the device.
    """
    global_crops, local_crops = geometric(image, rng, cfg)
    params = photometric_params(rng, cfg.n_global, cfg.local_crops_number, cfg)
    global_params, local_params = split_params(params, cfg.n_global)
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "global_params": global_params,
        "local_params": local_params,
    }
