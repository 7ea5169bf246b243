"""The DINOv2 / CheXFound multi-crop augmentation (chexfound_jax/data/augment.py, official data/augmentations.py).

References are independent of the module: a literal transcription of torchvision's RandomResizedCrop
sampler with Python's ``random``, PIL's own ImageEnhance / ImageOps / crop+resize, and torchvision's
Gaussian blur rebuilt from torch.nn.functional (torchvision itself does not import here).
"""

from __future__ import annotations

import math
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from chexfound_jax.data import augment
from chexfound_jax.data.augment import AugmentConfig
from configs.pretrain import tiny_cpu, vitl16_512

IMAGES = sorted((pathlib.Path(__file__).parent / "data" / "images").glob("*.png"))
FULL = AugmentConfig.from_config(vitl16_512.get_config())
TINY = AugmentConfig.from_config(tiny_cpu.get_config())
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
KS_C = 1.949  # two-sided Kolmogorov-Smirnov critical coefficient at alpha = 0.001


def _xray(i: int = 0) -> np.ndarray:
    with Image.open(IMAGES[i]) as img:
        assert img.mode == "L" and img.size == (512, 512)
        return np.asarray(img)


def _params(n: int, **kw) -> dict[str, np.ndarray]:
    """Photometric params for n crops with every op off; keyword arrays (or scalars) switch ops on."""
    p = {
        "jitter": np.zeros(n, bool),
        "brightness": np.ones(n, np.float32),
        "contrast": np.ones(n, np.float32),
        "brightness_first": np.ones(n, bool),
        "blur": np.zeros(n, bool),
        "sigma": np.ones(n, np.float32),
        "solarize": np.zeros(n, bool),
    }
    for k, v in kw.items():
        p[k] = np.broadcast_to(np.asarray(v, p[k].dtype), (n,)).copy()
    return p


def _ks_2samp(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def _ks_1samp(x: np.ndarray, cdf) -> float:
    x = np.sort(x)
    f = cdf(x)
    n = x.size
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def _reference_box(r: random.Random, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, transcribed with Python's random (int(round(.)) is round(.))."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * r.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(r.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            return r.randint(0, height - h), r.randint(0, width - w), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------


def test_config_comes_from_cfg_crops():
    assert (FULL.global_crops_size, FULL.local_crops_size, FULL.local_crops_number) == (512, 144, 8)
    assert FULL.global_crops_scale == (0.32, 1.0) and FULL.local_crops_scale == (0.05, 0.32)
    assert (TINY.global_crops_size, TINY.local_crops_size, TINY.local_crops_number) == (64, 32, 2)
    assert FULL.n_global == 2 and FULL.global_blur_p == (0.0, 0.9) and FULL.local_blur_p == 0.5
    assert AugmentConfig.from_config(vitl16_512.get_config(), quantize=False).quantize is False


# ----------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [FULL.global_crops_scale, FULL.local_crops_scale])
def test_crop_boxes_match_the_torchvision_sampler(scale):
    height, width, n = 512, 600, 20000
    rng, r = np.random.default_rng(0), random.Random(0)
    ours = np.array([augment.random_resized_crop_box(rng, height, width, scale, FULL.ratio) for _ in range(n)])
    ref = np.array([_reference_box(r, height, width, scale, FULL.ratio) for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # The target area lies in scale; rounding w and h moves it by at most half a pixel each way.
    whole = (h == height) & (w == width)  # the fallback (a whole-image box) and nothing else may leave it
    area = height * width
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-9)[~whole].all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-9)[~whole].all()
    crit = KS_C * math.sqrt(2 / n)
    for stat in (
        lambda b: b[:, 2] * b[:, 3] / area,  # area fraction
        lambda b: np.log(b[:, 3] / b[:, 2]),  # log aspect ratio
        lambda b: (b[:, 0] + b[:, 2] / 2) / height,  # vertical centre
        lambda b: (b[:, 1] + b[:, 3] / 2) / width,  # horizontal centre
    ):
        assert _ks_2samp(stat(ours), stat(ref)) < crit


def test_global_area_fraction_follows_the_accepted_uniform():
    """On a square image the area fraction f ~ U(0.32, 1) is kept with probability min(1, -ln f / ln(4/3)).

    Rejection is rare only below f = 3/4; above it a crop with f * r > 1 does not fit. So the accepted
    f has density ∝ that acceptance, and the draws are tested against its exact CDF. The same draws must
    also be far from plain U(0.32, 1), which shows the test can tell the two apart.
    """
    n, side = 20000, 512
    rng = np.random.default_rng(1)
    boxes = np.array([augment.random_resized_crop_box(rng, side, side, (0.32, 1.0)) for _ in range(n)])
    frac = boxes[:, 2] * boxes[:, 3] / side**2
    lo, knee, lr = 0.32, 0.75, math.log(4 / 3)

    def phi(u):  # antiderivative of -ln u
        return u - u * np.log(u)

    def g(f):
        return np.minimum(f, knee) - lo + np.where(f > knee, (phi(np.maximum(f, knee)) - phi(knee)) / lr, 0.0)

    def cdf(f):
        return np.clip(g(np.clip(f, lo, 1.0)) / g(np.float64(1.0)), 0, 1)

    crit = KS_C / math.sqrt(n)
    assert _ks_1samp(frac, cdf) < crit
    assert _ks_1samp(frac, lambda f: np.clip((f - lo) / (1 - lo), 0, 1)) > 3 * crit
    below = frac[frac <= knee]
    assert _ks_1samp(below, lambda f: np.clip((f - lo) / (knee - lo), 0, 1)) < KS_C / math.sqrt(below.size)


def test_crop_box_fallback_is_a_clamped_central_crop():
    rng = np.random.default_rng(0)
    # Nothing with aspect <= 4/3 and area >= 90 % fits in a 10 x 1000 strip.
    assert augment.random_resized_crop_box(rng, 10, 1000, (0.9, 1.0)) == (0, (1000 - 13) // 2, 10, 13)
    assert augment.random_resized_crop_box(rng, 1000, 10, (0.9, 1.0)) == ((1000 - 13) // 2, 0, 13, 10)  # 10 / (3/4)


def test_geometric_equals_pil_crop_then_resize():
    img = _xray(0)
    global_crops, local_crops = augment.geometric(img, np.random.default_rng(7), FULL)
    assert global_crops.shape == (2, 512, 512) and local_crops.shape == (8, 144, 144)
    assert global_crops.dtype == np.uint8 and local_crops.dtype == np.uint8
    rng, pil = np.random.default_rng(7), Image.fromarray(img)
    flips = []
    for crops, size, scale in (
        (global_crops, 512, FULL.global_crops_scale),
        (local_crops, 144, FULL.local_crops_scale),
    ):
        for got in crops:
            top, left, h, w = augment.random_resized_crop_box(rng, 512, 512, scale, FULL.ratio)
            want = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
            flips.append(rng.random() < 0.5)
            np.testing.assert_array_equal(got, np.asarray(ImageOps.mirror(want) if flips[-1] else want))
    assert any(flips) and not all(flips)  # both branches were compared


def test_flip_rate_is_one_half():
    """With whole-image boxes at the image's own size, every crop is the image or its mirror."""
    cfg = AugmentConfig(
        global_crops_size=8,
        local_crops_size=8,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
    )
    img = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    rng = np.random.default_rng(1)
    flipped = total = 0
    for _ in range(2000):
        g, loc = augment.geometric(img, rng, cfg)
        crops = np.concatenate([g, loc])
        same = (crops == img).all(axis=(1, 2))
        mirrored = (crops == img[:, ::-1]).all(axis=(1, 2))
        assert (same ^ mirrored).all()
        flipped += int(mirrored.sum())
        total += len(crops)
    assert abs(flipped / total - 0.5) < 5 * math.sqrt(0.25 / total)


def test_uint16_records_are_rounded_to_8_bits():
    x = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(augment.to_uint8(x[None]), np.round(x / 257.0).astype(np.uint8)[None])
    img = _xray(1)
    noise = np.random.default_rng(0).integers(-128, 129, img.shape)
    img16 = np.clip(img.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)  # rounds back to img
    got = augment.geometric(img16, np.random.default_rng(3), TINY)
    want = augment.geometric(img, np.random.default_rng(3), TINY)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(augment.to_uint8(img[..., None]), img)


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="uint8 or uint16"):
        augment.to_uint8(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="single-channel"):
        augment.to_uint8(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="global crops"):
        augment.photometric_params(np.random.default_rng(0), 3, 8, FULL)


# ----------------------------------------------------------------------------------------------------
# photometric draws
# ----------------------------------------------------------------------------------------------------


def test_photometric_param_rates():
    rng, n = np.random.default_rng(0), 20000
    draws = [augment.photometric_params(rng, 2, 8, FULL) for _ in range(n)]
    p = {k: np.stack([d[k] for d in draws]) for k in augment.PARAM_KEYS}  # (n, 10)
    for k in ("jitter", "brightness_first", "blur", "solarize"):
        assert p[k].dtype == bool and p[k].shape == (n, 10)
    for k in ("brightness", "contrast", "sigma"):
        assert p[k].dtype == np.float32 and p[k].shape == (n, 10)

    def rate_ok(x: np.ndarray, prob: float) -> bool:
        if prob in (0.0, 1.0):
            return bool((x == bool(prob)).all())
        return abs(x.mean() - prob) < 5 * math.sqrt(prob * (1 - prob) / x.size)

    assert rate_ok(p["jitter"], 0.8) and rate_ok(p["brightness_first"], 0.5)
    assert rate_ok(p["blur"][:, 0], 0.0) and rate_ok(p["blur"][:, 1], 0.9) and rate_ok(p["blur"][:, 2:], 0.5)
    assert rate_ok(p["solarize"][:, 0], 0.0) and rate_ok(p["solarize"][:, 1], 0.2)
    assert rate_ok(p["solarize"][:, 2:], 0.0)
    for k, (lo, hi) in (("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)), ("sigma", (0.1, 2.0))):
        x = p[k].astype(np.float64).ravel()
        assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6
        assert _ks_1samp(x, lambda v, lo=lo, hi=hi: np.clip((v - lo) / (hi - lo), 0, 1)) < KS_C / math.sqrt(x.size)
    g, loc = augment.split_params(draws[0], 2)
    assert all(g[k].shape == (2,) and loc[k].shape == (8,) for k in augment.PARAM_KEYS)


# ----------------------------------------------------------------------------------------------------
# photometric ops against hand-computed values and PIL
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [True, False])
def test_brightness_of_a_constant_image(quantize):
    cfg = AugmentConfig(quantize=quantize)
    values = np.array([0, 1, 100, 150, 200, 255], np.uint8)
    crops = np.broadcast_to(values[:, None, None], (6, 5, 7))
    for f in (np.float32(0.6), np.float32(1.234), np.float32(1.4)):
        got = augment.intensity(crops, _params(6, jitter=True, brightness=f), cfg)
        v = values.astype(np.float32) * f
        want = np.clip(np.floor(v) if quantize else v, 0, 255)
        np.testing.assert_array_equal(got, np.broadcast_to(want[:, None, None], got.shape))


def test_contrast_of_a_two_level_image():
    img = np.full((4, 4), 10, np.uint8)
    img[0] = 201  # mean (12 * 10 + 4 * 201) / 16 = 57.75; PIL blends with int(57.75 + 0.5) = 58
    for quantize, mean in ((True, 58.0), (False, 57.75)):
        cfg = AugmentConfig(quantize=quantize)
        for f in (0.5, 1.4):
            got = augment.intensity(img[None], _params(1, jitter=True, contrast=f), cfg)[0]
            hi, lo = mean + np.float32(f) * (201 - mean), mean + np.float32(f) * (10 - mean)
            hi, lo = (np.floor(hi), np.floor(lo)) if quantize else (hi, lo)
            np.testing.assert_allclose(got[0], np.clip(hi, 0, 255), rtol=0, atol=1e-4)
            np.testing.assert_allclose(got[1:], np.clip(lo, 0, 255), rtol=0, atol=1e-4)
    # the hand values: f = 0.5 -> 129 and 34; f = 1.4 -> 255 (258.2 clipped) and 0 (-9.2 clipped)
    cfg = AugmentConfig()
    for f, hi, lo in ((0.5, 129, 34), (1.4, 255, 0)):
        got = augment.intensity(img[None], _params(1, jitter=True, contrast=f), cfg)[0]
        assert got[0, 0] == hi and got[3, 3] == lo


def test_jitter_equals_pil_image_enhance_bit_for_bit():
    rng = np.random.default_rng(0)
    _, crops = augment.geometric(_xray(0), rng, FULL)
    for order in (True, False):
        fb = rng.uniform(0.6, 1.4, 8).astype(np.float32)
        fc = rng.uniform(0.6, 1.4, 8).astype(np.float32)
        p = _params(8, jitter=True, brightness=fb, contrast=fc, brightness_first=order)
        want = []
        for c, b, k in zip(crops, fb, fc, strict=True):
            im = Image.fromarray(c)
            if order:
                im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(float(b))).enhance(float(k))
            else:
                im = ImageEnhance.Brightness(ImageEnhance.Contrast(im).enhance(float(k))).enhance(float(b))
            want.append(np.asarray(im))
        want = np.stack(want).astype(np.float32)
        np.testing.assert_array_equal(augment.intensity(crops, p, FULL), want)
        np.testing.assert_array_equal(augment.photometric(crops, p, FULL), augment.normalize_rgb(want, FULL))


def test_solarize_known_pixels():
    x = np.array([[0, 1, 127, 128, 129, 200, 255]], np.uint8)
    got = augment.intensity(x[None], _params(1, solarize=True), FULL)[0, 0]
    np.testing.assert_array_equal(got, [0, 1, 127, 127, 126, 55, 0])
    np.testing.assert_array_equal(augment.intensity(x[None], _params(1), FULL)[0, 0], x[0])
    pil = np.asarray(ImageOps.solarize(Image.fromarray(x), 128))
    np.testing.assert_array_equal(got, pil[0])


def test_normalization_is_imagenet_per_channel():
    x = np.array([[[0, 51, 255]]], np.uint8)
    got = augment.photometric(x, _params(1), FULL)
    assert got.shape == (1, 1, 3, 3) and got.dtype == np.float32
    for j, v in enumerate((0, 51, 255)):
        np.testing.assert_allclose(got[0, 0, j], (v / 255 - MEAN.astype(np.float64)) / STD, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[0, 0, 2], [2.2489083, 2.4285715, 2.64], atol=1e-6)


def test_quantized_and_continuous_paths_differ_by_a_few_levels():
    """Per-op truncation loses < 1 level, the integer contrast mean < 0.5; contrast scales errors by up to 1.4.

    Brightness then contrast: 1.4 * 1 + 0.4 * 1.5 + 1 = 3 levels; the blur's rounding adds 0.5, and
    solarize's threshold 1 more. So there are at most 4.5 levels between the two, and one on average.
    """
    rng = np.random.default_rng(0)
    worst, mean = 0.0, []
    for i in range(3):
        _, loc = augment.geometric(_xray(i % 2), rng, FULL)
        p = augment.photometric_params(rng, 0, 8, FULL)
        p["jitter"][:] = True
        p["solarize"][::2] = True
        q = augment.intensity(loc, p, FULL)
        c = augment.intensity(loc, p, AugmentConfig(quantize=False))
        worst = max(worst, float(np.abs(q - c).max()))
        mean.append(float(np.abs(q - c).mean()))
    assert worst <= 4.5 and np.mean(mean) < 1.5
    assert worst > 0.5  # they are really different paths


def test_host_fast_path_equals_the_array_generic_code():
    rng = np.random.default_rng(5)
    for i in range(4):
        g, loc = augment.geometric(_xray(i % 2), rng, FULL)
        p = augment.photometric_params(rng, 2, 8, FULL)
        if i == 0:  # all ops on, including solarize on locals
            p = {**p, "jitter": np.ones(10, bool), "blur": np.ones(10, bool), "solarize": np.ones(10, bool)}
        gp, lp = augment.split_params(p, 2)
        for crops, q in ((g, gp), (loc, lp)):
            got = augment.photometric(crops, q, FULL)
            want = augment.normalize_rgb(augment.intensity(crops, q, FULL), FULL)
            np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------
# blur against torch (torchvision's F.gaussian_blur, rebuilt from torch.nn.functional)
# ----------------------------------------------------------------------------------------------------


def _torch_blur(img: np.ndarray, sigma: float, quantize: bool) -> np.ndarray:
    """torchvision's tensor gaussian_blur: 2-D kernel, reflect padding, conv2d; uint8 output rounded."""
    import torch

    fn = torch.nn.functional
    k = 9
    x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = k1[:, None] * k1[None, :]
    t = fn.pad(torch.from_numpy(img.astype(np.float32))[None, None], [k // 2] * 4, mode="reflect")
    out = fn.conv2d(t, k2[None, None])[0, 0]
    return (torch.round(out) if quantize else out).numpy()


@pytest.mark.torch
def test_blur_of_an_impulse_is_the_torchvision_kernel():
    import torch

    img = np.zeros((21, 23), np.float32)
    img[10, 11] = 1.0
    for sigma in (0.1, 0.7, 2.0):
        kernel = augment.gaussian_kernels(np.float32(sigma), True, FULL)
        got = augment.gaussian_blur(img, kernel)
        x = torch.linspace(-4, 4, 9)
        k1 = torch.exp(-0.5 * (x / sigma).pow(2))
        k1 = (k1 / k1.sum()).numpy()
        np.testing.assert_allclose(kernel, k1, rtol=1e-6, atol=1e-8)
        want = np.zeros_like(img)
        want[6:15, 7:16] = np.outer(k1, k1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        np.testing.assert_allclose(got, _torch_blur(img, sigma, quantize=False), rtol=0, atol=1e-7)
    # no blur is an exact identity (a unit impulse), which keeps shapes fixed under jit
    np.testing.assert_array_equal(augment.gaussian_kernels(np.float32(1.0), False, FULL), np.eye(9)[4])


@pytest.mark.torch
def test_blur_of_an_xray_crop_matches_torch():
    rng = np.random.default_rng(2)
    g, loc = augment.geometric(_xray(1), rng, FULL)
    for crop, sigma in ((loc[0], 0.1), (loc[1], 1.3), (g[0], 2.0)):
        sig = np.float32(sigma)
        got = augment.gaussian_blur(crop.astype(np.float32), augment.gaussian_kernels(sig, True, FULL))
        ref = _torch_blur(crop, float(sig), quantize=False)
        np.testing.assert_allclose(got / 255, ref / 255, rtol=0, atol=1e-6)  # well inside the 1e-4 asked for
        # Quantised, torchvision rounds the float result: one level at most, where a value sits at .5.
        q = augment.intensity(crop[None], _params(1, blur=True, sigma=sig), FULL)[0]
        rq = _torch_blur(crop, float(sig), quantize=True)
        assert np.abs(q - rq).max() <= 1 and (q != rq).mean() < 1e-3


@pytest.mark.torch
def test_photometric_equals_the_pil_torch_pipeline():
    """jitter (PIL) -> blur (torch conv2d, rounded) -> solarize (PIL) -> ToTensor -> Normalize, end to end."""
    rng = np.random.default_rng(11)
    g, loc = augment.geometric(_xray(0), rng, FULL)
    crops = np.concatenate([g[:, :144, :144], loc])  # 10 crops of 144, to keep torch quick
    p = augment.photometric_params(rng, 2, 8, FULL)
    p["jitter"][:3] = True
    p["blur"][1:4] = True
    p["solarize"][[1, 3, 5]] = True
    want = []
    for i, c in enumerate(crops):
        im = Image.fromarray(c)
        if p["jitter"][i]:
            b, k = float(p["brightness"][i]), float(p["contrast"][i])
            enh = [
                lambda m, b=b: ImageEnhance.Brightness(m).enhance(b),
                lambda m, k=k: ImageEnhance.Contrast(m).enhance(k),
            ]
            for op in enh if p["brightness_first"][i] else enh[::-1]:
                im = op(im)
        if p["blur"][i]:
            im = Image.fromarray(_torch_blur(np.asarray(im), float(p["sigma"][i]), quantize=True).astype(np.uint8))
        if p["solarize"][i]:
            im = ImageOps.solarize(im, 128)
        want.append((np.asarray(im, np.float32)[..., None] / np.float32(255) - MEAN) / STD)
    got = augment.photometric(crops, p, FULL)
    diff = np.abs(got - np.stack(want))
    assert diff.max() <= 1 / (255 * STD.min()) + 1e-5 and (diff > 1e-5).mean() < 1e-3


# ----------------------------------------------------------------------------------------------------
# numpy vs jax, shapes
# ----------------------------------------------------------------------------------------------------


def test_numpy_and_jitted_jax_agree():
    rng = np.random.default_rng(4)
    examples = [augment.multi_crop(_xray(i), rng, TINY) for i in range(2)]
    for kind in ("global", "local"):
        crops = np.stack([e[f"{kind}_crops"] for e in examples])  # (2 examples, n crops, s, s)
        params = {k: np.stack([e[f"{kind}_params"][k] for e in examples]) for k in augment.PARAM_KEYS}
        params["jitter"][0] = True
        params["blur"][1] = True
        params["solarize"][:, 0] = True
        for cfg in (TINY, AugmentConfig.from_config(tiny_cpu.get_config(), quantize=False)):
            want = augment.photometric(crops, params, cfg)
            got = np.asarray(jax.jit(lambda c, p, cfg=cfg: augment.photometric(c, p, cfg, xp=jnp))(crops, params))
            assert got.shape == (*crops.shape, 3) and got.dtype == np.float32
            if cfg.quantize:
                # Exact, except that XLA may fuse the blur's multiply-adds, which can flip the rounding of a
                # value sitting at .5 by one level (about 1 pixel in 10^5 at 512 px).
                diff = np.abs(got - want)
                assert diff.max() <= 1 / (255 * STD.min()) + 1e-5 and (diff > 1e-5).mean() < 1e-3
                no_blur = ~params["blur"]
                np.testing.assert_allclose(got[no_blur], want[no_blur], rtol=0, atol=1e-5)
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, FULL], ids=["tiny", "full"])
def test_multi_crop_shapes_and_dtypes(cfg):
    out = augment.multi_crop(_xray(0), np.random.default_rng(0), cfg)
    s, ls, n = cfg.global_crops_size, cfg.local_crops_size, cfg.local_crops_number
    assert out["global_crops"].shape == (2, s, s) and out["global_crops"].dtype == np.uint8
    assert out["local_crops"].shape == (n, ls, ls) and out["local_crops"].dtype == np.uint8
    for key, m in (("global_params", 2), ("local_params", n)):
        assert set(out[key]) == set(augment.PARAM_KEYS)
        for k, v in out[key].items():
            assert v.shape == (m,) and v.dtype == (np.float32 if k in ("brightness", "contrast", "sigma") else bool)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for crops, params, size in (
        (out["global_crops"], out["global_params"], s),
        (out["local_crops"], out["local_params"], ls),
    ):
        x = augment.photometric(crops, params, cfg)
        assert x.shape == (len(crops), size, size, 3) and x.dtype == np.float32
        assert np.isfinite(x).all() and (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
        # the three channels are one gray image under three affine maps
        np.testing.assert_allclose((x * STD + MEAN)[..., 0], (x * STD + MEAN)[..., 2], rtol=0, atol=1e-5)
