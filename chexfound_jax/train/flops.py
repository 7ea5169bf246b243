"""Model FLOPs of one pretraining step per image, the numerator of MFU.

Per image (one sample of the global batch, i.e. its 2 global and n local crops):
  teacher forward on the 2 global crops (no backward);
  student forward + backward (3x forward) on the 2 global and n local crops;
  heads: the DINO head on the class tokens (teacher 2, student 2 + n crops, student 3x) and the
  iBOT head on the masked patch tokens of the global crops (teacher 1x, student 3x), with the
  expected number of masked tokens of the masking config.
CheXFound ViT-L/16 at 512/144 with 2 + 8 crops: 7.09 TFLOP per image for the backbones alone.
"""

from __future__ import annotations

from typing import Any

from chexfound_jax.models.flops import dino_head_flops, vit_forward_flops
from chexfound_jax.train import recipe

BACKWARD_FACTOR = 3  # forward + backward = 3 forwards of matmul FLOPs


def expected_masked_tokens_per_image(cfg: Any) -> float:
    """Mean masked tokens per global crop: a fraction `mask_sample_probability` of the crops is
    masked, each with a ratio drawn uniformly from `mask_ratio_min_max` (the mean of the bins)."""
    lo, hi = cfg.ibot.mask_ratio_min_max
    tokens = (cfg.crops.global_crops_size // cfg.model.patch_size) ** 2
    return cfg.ibot.mask_sample_probability * tokens * (lo + hi) / 2


def train_flops_per_image(cfg: Any) -> dict[str, float]:
    """{"backbone", "heads", "total"} model FLOPs of one training step, per image of the batch."""
    model_cfg = recipe.model_config(cfg)
    vit = model_cfg.backbone
    g, s, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    global_fwd = 2 * vit_forward_flops(vit, g)
    student_fwd = global_fwd + n_local * vit_forward_flops(vit, s)
    backbone = global_fwd + BACKWARD_FACTOR * student_fwd

    def head(head_cfg):
        return dino_head_flops(
            head_cfg.in_dim, head_cfg.hidden_dim, head_cfg.bottleneck_dim, head_cfg.out_dim, head_cfg.nlayers
        )

    dino = head(model_cfg.dino_head)
    ibot = head(model_cfg.ibot_head or model_cfg.dino_head)
    masked = 2 * expected_masked_tokens_per_image(cfg)
    heads = dino * (2 + BACKWARD_FACTOR * (2 + n_local)) + ibot * masked * (1 + BACKWARD_FACTOR)
    return {"backbone": float(backbone), "heads": float(heads), "total": float(backbone + heads)}
