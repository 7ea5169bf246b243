"""Analytic model FLOPs of the backbone and the projection head, for MFU accounting.

Model FLOPs utilisation (MFU) divides the FLOPs the model *needs* by the time taken and the
chip's peak. The numerator must therefore not depend on how XLA happens to compile the step
(rematerialisation, fused or unfused attention, padding), so it is counted here from the
architecture alone, the way the PaLM / DINOv2-style accounting does.

Conventions: one multiply-add is 2 FLOPs; only the matrix multiplications are counted. Left out
are LayerNorm, softmax, GELU / SiLU, the SwiGLU gate product, LayerScale, residual adds, biases,
the position-embedding interpolation and the concatenation of cls / register tokens. These are
a fraction of a percent of a ViT-L forward, and XLA's own `cost_analysis()` count, which includes
them, is an upper bound on these figures (tests/test_flops.py checks the band).

For a backbone on an H x W image with patch size p, C input channels, width D, FFN hidden H_f,
N = (H // p) * (W // p) patches and T = 1 + registers + N tokens:

    patch embedding     2 * N * (p*p*C) * D
    per block:
      qkv projection    2 * T * D * 3D
      attention scores  2 * T * T * D       (q @ k^T, summed over heads)
      weighted values   2 * T * T * D       (p @ v)
      output projection 2 * T * D * D
      FFN, SwiGLU       2 * T * D * 2H_f + 2 * T * H_f * D   (fused w12, then w3)
      FFN, MLP          2 * T * D * H_f * 2                  (fc1, fc2)

CheXFound ViT-L/16 reg4 SwiGLU (H_f = 2736): 125.8 GFLOP per image at 224 x 224 and 728.0 GFLOP
at 512 x 512. A training step costs about 3x the forward (backward = 2x), plus the recomputed
forward under remat, which MFU does not credit.
"""

from __future__ import annotations

import itertools

from chexfound_jax.models.vit import ViTConfig


def _patches(cfg: ViTConfig, height: int, width: int | None) -> int:
    width = height if width is None else width
    return (height // cfg.patch_size) * (width // cfg.patch_size)  # PatchEmbed crops a ragged border


def patch_embed_flops(cfg: ViTConfig, height: int, width: int | None = None) -> int:
    """Matmul FLOPs of the patch embedding of one height x width image."""
    return 2 * _patches(cfg, height, width) * (cfg.patch_size**2 * cfg.in_chans) * cfg.embed_dim


def vit_block_flops(cfg: ViTConfig, height: int, width: int | None = None) -> int:
    """Matmul FLOPs of one transformer block (attention and FFN branches) on one height x width image's tokens."""
    d = cfg.embed_dim
    t = 1 + cfg.num_register_tokens + _patches(cfg, height, width)
    qkv = 2 * t * d * 3 * d
    scores = 2 * t * t * d
    values = 2 * t * t * d
    proj = 2 * t * d * d
    h = cfg.hidden_dim
    if cfg.ffn_layer == "swiglufused":
        ffn = 2 * t * d * 2 * h + 2 * t * h * d
    else:
        ffn = 2 * t * d * h * 2
    return qkv + scores + values + proj + ffn


def vit_forward_flops(cfg: ViTConfig, height: int, width: int | None = None) -> int:
    """Matmul FLOPs of `VisionTransformer.forward_features` on one height x width image:
    patch_embed_flops + depth * vit_block_flops."""
    return patch_embed_flops(cfg, height, width) + cfg.depth * vit_block_flops(cfg, height, width)


def dino_head_flops(in_dim: int, hidden: int, bottleneck: int, prototypes: int, nlayers: int = 3) -> int:
    """Matmul FLOPs of one `DINOHead` on one input vector (a class or a patch token).

    The MLP is in_dim -> hidden x (nlayers - 1) -> bottleneck (in_dim -> bottleneck when
    nlayers == 1), then the weight-normalised prototype layer bottleneck -> prototypes. The L2
    normalisation and the weight normalisation (per step, not per token) are not counted.
    Multiply by the number of tokens the head sees in a step.
    """
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
    mlp = sum(2 * i * o for i, o in itertools.pairwise(dims))
    return mlp + 2 * bottleneck * prototypes
