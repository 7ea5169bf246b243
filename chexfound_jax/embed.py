r"""Embed chest X-rays with a CheXFound backbone: image files in, an .npz of features out.

  python -m chexfound_jax.embed --checkpoint=WEIGHTS_DIR --out=FEATURES.npz IMAGE...

WEIGHTS_DIR is what `python -m chexfound_jax.convert --to=jax` writes. Images are PNG, JPEG or DICOM
(decoded to an 8-bit display image by data_prep). Each image goes through the
official evaluation preprocessing (resize the shorter side and centre-crop to --image_size, per-channel
min-max, ImageNet normalisation). The .npz holds, in input order (B images, D = embed_dim,
R registers, N patches, n = --n_last_blocks), all float32 except `paths`:

  paths              (B,)        the image paths as given
  cls_token          (B, D)      forward_features x_norm_clstoken
  register_tokens    (B, R, D)   forward_features x_norm_regtokens
  patch_tokens       (B, N, D)   forward_features x_norm_patchtokens
  last_blocks_cls    (B, n, D)   get_intermediate_layers(n, norm=True) class tokens, shallow to deep
  last_blocks_patch  (B, n, N, D) the matching patch tokens (what CheXFound's linear/GLoRI heads read)

Every image is read and checked before the model is loaded; an unreadable or constant image stops the
run with `embed: <file>: <reason>` and a non-zero exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from chexfound_jax import cli
from chexfound_jax.convert.backbone import load_backbone
from chexfound_jax.data import preprocess
from chexfound_jax.models.build import model_from_params
from chexfound_jax.models.vit import VisionTransformer

FEATURE_KEYS = ("cls_token", "register_tokens", "patch_tokens", "last_blocks_cls", "last_blocks_patch")


def load_images(paths: Sequence[str | os.PathLike], image_size: int) -> np.ndarray:
    """(B, S, S, 3) float32 model inputs; the first bad file raises preprocess.ImageError."""
    return np.stack([preprocess.preprocess(p, resize_size=image_size, crop_size=image_size) for p in paths])


def _features(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, n: int) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    blocks = model.last_blocks(x, n, norm=True)  # the deepest entry is forward_features' output
    cls, registers, patches = blocks[-1]
    features = {
        "cls_token": cls,
        "register_tokens": registers,
        "patch_tokens": patches,
        "last_blocks_cls": jnp.stack([c for c, _, _ in blocks], axis=1),
        "last_blocks_patch": jnp.stack([p for _, _, p in blocks], axis=1),
    }
    return {k: v.astype(np.float32) for k, v in features.items()}


_features_jit = jax.jit(_features, static_argnums=(0, 3))


def embed_arrays(model: VisionTransformer, images: np.ndarray, batch_size: int, n_last_blocks: int = 4) -> dict:
    """Features of preprocessed (B, H, W, 3) images, as numpy float32 arrays keyed as FEATURE_KEYS.

    Every batch has the same shape (the last one is zero-padded and the padding dropped), so the
    forward pass compiles once.
    """
    if len(images) == 0:
        raise ValueError("no images to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = np.asarray(images, np.float32)
    graphdef, state = nnx.split(model)
    size = min(batch_size, len(images))
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    for start in range(0, len(images), size):
        batch = images[start : start + size]
        real = len(batch)
        if real < size:
            batch = np.concatenate([batch, np.zeros((size - real, *batch.shape[1:]), batch.dtype)])
        out = jax.device_get(_features_jit(graphdef, state, batch, n_last_blocks))
        for k in FEATURE_KEYS:
            chunks[k].append(np.asarray(out[k][:real]))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def embed_images(
    model: VisionTransformer,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 8,
    image_size: int | None = None,
    n_last_blocks: int = 4,
) -> dict[str, np.ndarray]:
    """The .npz contents for image files: `paths` plus FEATURE_KEYS (image_size defaults to the model's)."""
    images = load_images(paths, image_size or model.config.img_size)
    features = embed_arrays(model, images, batch_size, n_last_blocks)
    return {"paths": np.asarray([os.fspath(p) for p in paths], dtype=str), **features}


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    flags.DEFINE_string("checkpoint", None, "Backbone: a weights directory, or a .pth / .safetensors file.")
    flags.DEFINE_integer("num_heads", None, "Attention heads of a PyTorch backbone, if not embed_dim / 64.")
    flags.DEFINE_string("out", None, "Output .npz file.")
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)
    flags.DEFINE_integer("image_size", None, "Resize/crop size; default: the backbone's img_size.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
    flags.DEFINE_integer("n_last_blocks", 4, "Blocks returned as last_blocks_*.", lower_bound=1)
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("no IMAGE given")
    try:
        vit_cfg, params = load_backbone(flags.FLAGS.checkpoint, flags.FLAGS.num_heads)
        if flags.FLAGS.n_last_blocks > vit_cfg.depth:
            raise app.UsageError(f"--n_last_blocks={flags.FLAGS.n_last_blocks} exceeds the depth {vit_cfg.depth}")
        images = load_images(paths, flags.FLAGS.image_size or vit_cfg.img_size)
    except (preprocess.ImageError, FileNotFoundError, ValueError) as e:
        sys.exit(f"embed: {e}")
    model = model_from_params(vit_cfg.replace(dtype=flags.FLAGS.dtype), params)
    features = embed_arrays(model, images, flags.FLAGS.batch_size, flags.FLAGS.n_last_blocks)
    with open(flags.FLAGS.out, "wb") as f:  # np.savez(path) would append ".npz" to other names
        np.savez(f, paths=np.asarray(paths, dtype=str), **features)
    logging.info("wrote %s: %d images, patch_tokens %s", flags.FLAGS.out, len(paths), features["patch_tokens"].shape)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
