"""The official CheXFound evaluation preprocessing (resize, centre crop, min-max, ImageNet normalise)."""

import json

import numpy as np
import pytest
from helpers import IMAGES, golden, import_timm
from PIL import Image

from chexfound_jax.data import preprocess

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def gold():
    return golden("backbone")


def _image(name: str):
    (path,) = [p for p in IMAGES if p.name == name]
    return path


@pytest.mark.parametrize(("case", "index", "crop"), [("img512", 0, 512), ("img512x448", 1, (512, 448))])
def test_matches_official_inputs(gold, case, index, crop):
    readme = json.loads(str(gold["README"]))
    assert f"{case} = NIH image {index + 1}" in readme["cases"]
    if case == "img512x448":
        assert "crop (512, 448)" in readme["cases"]
    x = preprocess.preprocess(_image(str(gold["image_files"][index])), resize_size=512, crop_size=crop)
    want = gold[f"{case}_input"][0].transpose(1, 2, 0)
    assert x.dtype == np.float32 and x.shape == want.shape
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)


def _save(tmp_path, pixels: np.ndarray, name: str = "img.png"):
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("hw", "size", "want"),
    [
        ((200, 300), 100, (100, 150)),  # landscape: height is the shorter side
        ((301, 200), 100, (150, 100)),  # portrait: 100 * 301 / 200 = 150.5 truncates to 150
        ((512, 512), 224, (224, 224)),
        ((517, 389), 224, (297, 224)),  # 224 * 517 / 389 = 297.7
    ],
)
def test_resized_shape_is_shorter_side_rule(hw, size, want):
    assert preprocess.resized_shape(*hw, size) == want


def test_non_square_image_shape_and_resample(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 300), dtype=np.uint8)  # H=200, W=300, grayscale
    x = preprocess.preprocess(_save(tmp_path, pixels), resize_size=128, crop_size=(128, 112))
    assert x.shape == (128, 112, 3) and x.dtype == np.float32
    # By hand: PIL bicubic to W=192 x H=128, crop columns 40..151, then min-max and normalise.
    resized = np.asarray(Image.fromarray(pixels).resize((192, 128), Image.Resampling.BICUBIC), np.float32) / 255
    crop = resized[:, 40:152]
    scaled = (crop - crop.min()) / (crop.max() - crop.min())
    want = (scaled[..., None] - MEAN) / STD
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)
    # a grayscale file gives three equal channels before normalisation
    np.testing.assert_allclose(x[..., 0] * STD[0] + MEAN[0], x[..., 1] * STD[1] + MEAN[1], atol=1e-6)


def test_center_crop_offsets_on_known_pixels(tmp_path):
    # pixel value = 10 * row + col, so a crop identifies its own offsets
    pixels = (10 * np.arange(5)[:, None] + np.arange(7)[None, :]).astype(np.uint8)  # H=5, W=7
    img = Image.fromarray(pixels)
    # top = round(0.5) = 0 (halves round to even, as torchvision), left = round(1.5) = 2
    assert preprocess.crop_box(5, 7, 4) == (2, 0, 6, 4)
    np.testing.assert_array_equal(np.asarray(preprocess.center_crop(img, 4)), pixels[0:4, 2:6])
    # (height, width): top = round(1.5) = 2, left = round(2.5) = 2
    assert preprocess.crop_box(5, 7, (2, 2)) == (2, 2, 4, 4)
    np.testing.assert_array_equal(np.asarray(preprocess.center_crop(img, (2, 2))), pixels[2:4, 2:4])
    with pytest.raises(ValueError, match="larger than"):
        preprocess.crop_box(5, 7, 6)

    # Whole pipeline with resize_size equal to the shorter side (no resampling): exact by hand.
    x = preprocess.preprocess(_save(tmp_path, pixels), resize_size=5, crop_size=(3, 5))
    crop = pixels[1:4, 1:6].astype(np.float32) / 255  # top = round(1.0) = 1, left = round(1.0) = 1
    scaled = (crop - crop.min()) / (crop.max() - crop.min())
    np.testing.assert_allclose(x, (scaled[..., None] - MEAN) / STD, rtol=0, atol=1e-6)
    assert x[0, 0, 0] == pytest.approx((0 - MEAN[0]) / STD[0]) and x[-1, -1, 0] == pytest.approx((1 - MEAN[0]) / STD[0])


def test_minmax_is_per_channel(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = np.arange(16).reshape(4, 4)  # 0..15
    rgb[..., 1] = 100 + 2 * np.arange(16).reshape(4, 4)  # 100..130
    rgb[..., 2] = 255 - np.arange(16).reshape(4, 4)  # 240..255
    x = preprocess.preprocess(_save(tmp_path, rgb), resize_size=4, crop_size=4)
    unnormalised = x * STD + MEAN
    np.testing.assert_allclose(unnormalised.min(axis=(0, 1)), 0, atol=1e-6)
    np.testing.assert_allclose(unnormalised.max(axis=(0, 1)), 1, atol=1e-6)
    np.testing.assert_allclose(unnormalised[..., 0], unnormalised[..., 1], atol=1e-6)
    np.testing.assert_allclose(unnormalised[..., 2], 1 - unnormalised[..., 0], atol=1e-6)


def test_custom_mean_std():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("RGB")
    x = preprocess.preprocess_image(img, 8, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.min() == -1 and x.max() == 1


def test_constant_image_error_names_file(tmp_path):
    path = _save(tmp_path, np.full((32, 48), 7, np.uint8), "flat_xray.png")
    with pytest.raises(ValueError, match=r"flat_xray\.png.*constant image"):
        preprocess.preprocess(path, resize_size=32, crop_size=32)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_file_error_names_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(preprocess.ImageError, match=r"broken\.png: cannot read image") as e:
        preprocess.preprocess(path)
    assert e.value.path == str(path)


def test_missing_file_error_names_file(tmp_path):
    with pytest.raises(preprocess.ImageError, match=r"missing\.png"):
        preprocess.preprocess(tmp_path / "missing.png")


def test_truncated_png_error_names_file(tmp_path):
    good = _save(tmp_path, np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    path = tmp_path / "truncated.png"
    path.write_bytes(good.read_bytes()[:200])
    with pytest.raises(preprocess.ImageError, match=r"truncated\.png"):
        preprocess.preprocess(path, resize_size=64, crop_size=64)


@pytest.mark.torch
def test_matches_torchvision_on_non_square_images():
    """Cross-check against the torchvision transforms themselves (torchvision comes with timm, a test dependency)."""
    import_timm()
    import torch
    from torchvision import transforms as T

    def minmax(t: torch.Tensor) -> torch.Tensor:
        lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
        return (t - lo) / (hi - lo)

    rng = np.random.default_rng(2)
    for (h, w), size, crop in [((200, 300), 128, (128, 112)), ((301, 200), 100, 100), ((517, 389), 224, 224)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        official = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(crop),
                T.ToTensor(),
                T.Lambda(minmax),
                T.Normalize(MEAN.tolist(), STD.tolist()),
            ]
        )
        want = official(img).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(preprocess.preprocess_image(img, size, crop), want, rtol=0, atol=1e-6)


def test_dicom_inputs_go_through_the_dicom_decoder(data_dir):
    chest = data_dir / "dicom" / "chest" / "cxr_dx_sc_mono2_8bit_implicitLE_nih_cxr14_via_gcp.dcm"
    x = preprocess.preprocess(chest)
    assert x.shape == (512, 512, 3) and x.dtype == np.float32
    gray = x[..., 0]
    lungs = np.r_[gray[150:280, 100:160].ravel(), gray[150:280, 350:410].ravel()].mean()
    assert lungs < gray[150:280, 235:275].mean() - 0.5  # dark lungs, bright mediastinum (normalised units)
    ct = data_dir / "dicom" / "negative" / "neg_ct_small_128px_explicitLE.dcm"
    with pytest.raises(preprocess.ImageError, match=r"neg_ct_small_128px_explicitLE\.dcm: rejected DICOM \(modality\)"):
        preprocess.preprocess(ct)
