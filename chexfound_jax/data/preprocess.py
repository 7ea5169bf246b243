"""The official CheXFound evaluation preprocessing, reproduced without torchvision.

The torchvision pipeline is Resize(size, bicubic) -> CenterCrop(crop) -> ToTensor -> per-channel
min-max rescale -> Normalize(ImageNet). Each step is a pure function here so that the features of
the released model can be reproduced bit for bit; the result is channels-last (H, W, 3) float32,
the layout the JAX backbone takes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RESIZE_SIZE = 512
CROP_SIZE = 512

# What PIL raises for missing, unreadable, truncated or undecodable files (UnidentifiedImageError is an OSError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageError(ValueError):
    """A file that cannot become a model input; the message starts with the file name."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def load_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image as RGB, as the official loader does (grayscale X-rays get 3 equal channels).

    PNG/JPEG go through PIL; DICOM files through data_prep's decoder (rescale, VOI window,
    MONOCHROME1 / Presentation LUT handling) to an 8-bit display image at native resolution, the
    form in which the public datasets were fed to CheXFound. The pixels are loaded here, so a
    truncated or corrupt file fails now and names itself.
    """
    if _is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except _PIL_ERRORS as e:
        raise ImageError(path, f"cannot read image: {e}") from e


def _is_dicom(path: str | os.PathLike) -> bool:
    if os.fspath(path).lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _load_dicom(path: str | os.PathLike) -> Image.Image:
    from data_prep import decode  # DICOM support lives with the data preparation

    try:
        decoded = decode.decode_dicom(path, min_size=0)
    except decode.Rejected as e:
        raise ImageError(path, f"rejected DICOM ({e.reason}): {e.message}") from e
    pixels = np.round(np.clip(decoded.pixels, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's Resize(int): the shorter side becomes `size`, the longer one is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size, BICUBIC) on a PIL image; an image already at that size is left as is."""
    height, width = resized_shape(img.height, img.width, size)
    if (height, width) == (img.height, img.width):
        return img
    return img.resize((width, height), Image.Resampling.BICUBIC)


def _pair(crop: int | Sequence[int]) -> tuple[int, int]:
    sizes = [int(c) for c in np.ravel(crop)]
    if len(sizes) == 1:
        return sizes[0], sizes[0]
    if len(sizes) != 2:
        raise ValueError(f"crop must be an int or (height, width), got {crop!r}")
    return sizes[0], sizes[1]


def crop_box(height: int, width: int, crop: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's CenterCrop: offsets round((size - crop) / 2)."""
    crop_h, crop_w = _pair(crop)
    if crop_h > height or crop_w > width:
        # torchvision would zero-pad, which then shifts the min-max rescale; resize larger instead.
        raise ValueError(f"crop {crop_h}x{crop_w} is larger than the resized image {height}x{width}")
    # Python's round halves to even, exactly as torchvision's int(round(...)) does (e.g. 0.5 -> 0, 1.5 -> 2).
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return left, top, left + crop_w, top + crop_h


def center_crop(img: Image.Image, crop: int | Sequence[int]) -> Image.Image:
    """torchvision CenterCrop(crop); crop is an int (square) or (height, width)."""
    return img.crop(crop_box(img.height, img.width, crop))


def to_float(img: Image.Image) -> np.ndarray:
    """ToTensor without the transpose: uint8 (H, W, 3) -> float32 in [0, 1]."""
    return np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Per-channel (x - min) / (max - min) over the image: CheXFound's contrast normalisation.

    X-rays come with very different windowing; stretching each channel to [0, 1] removes that.
    A channel with max == min has no contrast to stretch and raises ValueError.
    """
    lo = x.min(axis=(0, 1))
    hi = x.max(axis=(0, 1))
    if np.any(hi == lo):
        raise ValueError("constant image (max == min): min-max rescaling would divide by zero")
    return (x - lo) / (hi - lo)


def normalize(x: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """torchvision Normalize on channels-last data, in float32 as torch computes it."""
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_image(
    img: Image.Image,
    resize_size: int = RESIZE_SIZE,
    crop_size: int | Sequence[int] = CROP_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """An RGB PIL image -> (crop_h, crop_w, 3) float32 model input."""
    x = to_float(center_crop(resize_shorter(img, resize_size), crop_size))
    return normalize(minmax_scale(x), mean, std)


def preprocess(
    path: str | os.PathLike,
    resize_size: int = RESIZE_SIZE,
    crop_size: int | Sequence[int] = CROP_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """An image file -> (crop_h, crop_w, 3) float32 model input; any per-file failure is an ImageError."""
    img = load_image(path)
    try:
        return preprocess_image(img, resize_size, crop_size, mean, std)
    except ValueError as e:
        raise ImageError(path, str(e)) from e
