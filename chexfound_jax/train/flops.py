"""Model FLOPs of one pretraining step per image, the numerator of MFU: nominal and executed.

Per image (one sample of the global batch, i.e. its 2 global and n local crops):
  teacher forward on the 2 global crops (no backward);
  student forward + backward (3x forward) on the 2 global and n local crops;
  heads: the DINO head on the class tokens (teacher 2, student 2 + n crops, student 3x) and the
  iBOT head on the masked patch tokens of the global crops (teacher 1x, student 3x), with the
  expected number of masked tokens of the masking config.

Nominal counts the student's blocks on every row. Executed counts what the step runs: with
DINOv2's batch-subset stochastic depth (model.drop_path_mode "subset" and drop_path_rate > 0.1,
chexfound_jax.models.vit.drop_path_residual), each block's attention and FFN branches run on only
keep = max(int(rows * (1 - rate)), 1) of the rows of a group (an official per-GPU batch of b
images): rows = 2b for the student's global forward, n_local * b for its local forward. The
dropped rows have no backward either, so the student's block FLOPs scale by keep / rows, forward
and backward alike. The patch embedding, token preparation, final norm, the teacher and the heads
run on all rows. Per-sample drop path (or a subset rate <= 0.1) computes every row: executed ==
nominal.

MFU is executed FLOPs over time and peak (what the chip did); the nominal figure is what a run
without the subset trick would need, and is logged beside it for comparison with other accountings.

CheXFound ViT-L/16 at 512/144 with 2 + 8 crops, 10 images per group (configs/pretrain/vitl16_512.py),
per image: backbones 7.093 TFLOP nominal, 4.843 executed (keep 12 of 20 global and 48 of 80 local
rows); with the heads (0.103 TFLOP) 7.196 TFLOP nominal (7,195,659,180,442 FLOP) against 4.946
TFLOP executed (4,946,041,896,960 FLOP), a ratio of 1.455. An MFU computed from the nominal figure
overstates the executed one by that ratio.

MFU per log interval (`throughput_metrics`; the override is a config value in FLOP/s):

    peak = hardware.peak_flops(jax.devices()[0].device_kind, peak_override)  # chexfound_jax.hardware
    f = train_flops_per_image(cfg, group_size)
    scalars.update(throughput_metrics(
        batch_size, f["executed_total"], progress.interval_step_time_s, jax.device_count(), peak,
        nominal_flops_per_image=f["total"]))
"""

from __future__ import annotations

from typing import Any

from chexfound_jax.models.flops import dino_head_flops, patch_embed_flops, vit_block_flops
from chexfound_jax.models.vit import ViTConfig
from chexfound_jax.train import recipe

BACKWARD_FACTOR = 3  # forward + backward = 3 forwards of matmul FLOPs
SUBSET_MIN_RATE = 0.1  # drop_path_residual uses the batch subset only above this rate (as DINOv2)


def expected_masked_tokens_per_image(cfg: Any) -> float:
    """Mean masked tokens per global crop: a fraction `mask_sample_probability` of the crops is
    masked, each with a ratio drawn uniformly from `mask_ratio_min_max` (the mean of the bins)."""
    lo, hi = cfg.ibot.mask_ratio_min_max
    tokens = (cfg.crops.global_crops_size // cfg.model.patch_size) ** 2
    return cfg.ibot.mask_sample_probability * tokens * (lo + hi) / 2


def group_size_of(cfg: Any, group_size: int | None = None) -> int:
    """Images per group b: `group_size` if given, else global_batch_size // train.batch_groups."""
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        return int(group_size)
    groups = cfg.train.batch_groups
    if groups == -1:
        raise ValueError(
            "train.batch_groups is -1 (one group per batch shard, known only with the mesh): pass group_size, "
            "e.g. global_batch_size // training.batch_spec['global_crops'].shape[0]"
        )
    if groups < 1:
        raise ValueError(f"train.batch_groups must be positive or -1, got {groups}")
    return cfg.train.global_batch_size // groups


def kept_rows(vit: ViTConfig, rows: int) -> int:
    """Rows of a group on which a student block's residual branches run (all of them unless subset drop path)."""
    rate = vit.drop_path_rate
    if vit.drop_path_mode == "subset" and rate > SUBSET_MIN_RATE:
        return max(int(rows * (1.0 - rate)), 1)  # the expression of models.vit.drop_path_residual
    return rows


def train_flops_per_image(cfg: Any, group_size: int | None = None) -> dict[str, float]:
    """Model FLOPs of one training step per image of the batch.

    {"backbone", "heads", "total"}: nominal (every student row through every block);
    {"executed_backbone", "executed_total"}: what runs under batch-subset drop path (the heads are
    the same in both). group_size is the images per group; None: global_batch_size //
    train.batch_groups, which must then not be -1 (see group_size_of).
    """
    model_cfg = recipe.model_config(cfg)
    vit = model_cfg.backbone
    b = group_size_of(cfg, group_size)
    g, s, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    embed_g, block_g = patch_embed_flops(vit, g), vit.depth * vit_block_flops(vit, g)
    embed_s, block_s = patch_embed_flops(vit, s), vit.depth * vit_block_flops(vit, s)

    teacher_fwd = 2 * (embed_g + block_g)
    student_fwd = teacher_fwd + n_local * (embed_s + block_s)
    backbone = teacher_fwd + BACKWARD_FACTOR * student_fwd

    rows_g, rows_l = 2 * b, n_local * b
    executed_student_fwd = 2 * (embed_g + block_g * kept_rows(vit, rows_g) / rows_g)
    if n_local:
        executed_student_fwd += n_local * (embed_s + block_s * kept_rows(vit, rows_l) / rows_l)
    executed_backbone = teacher_fwd + BACKWARD_FACTOR * executed_student_fwd

    def head(head_cfg):
        return dino_head_flops(
            head_cfg.in_dim, head_cfg.hidden_dim, head_cfg.bottleneck_dim, head_cfg.out_dim, head_cfg.nlayers
        )

    dino = head(model_cfg.dino_head)
    ibot = head(model_cfg.ibot_head or model_cfg.dino_head)
    masked = 2 * expected_masked_tokens_per_image(cfg)
    heads = dino * (2 + BACKWARD_FACTOR * (2 + n_local)) + ibot * masked * (1 + BACKWARD_FACTOR)
    return {
        "backbone": float(backbone),
        "heads": float(heads),
        "total": float(backbone + heads),
        "executed_backbone": float(executed_backbone),
        "executed_total": float(executed_backbone + heads),
    }


def ibot_extra_teacher_flops_per_image(cfg: Any, passes: int) -> float:
    """FLOPs per image of recomputing the teacher's iBOT logits `passes` more times.

    A chunked Sinkhorn-Knopp that does not keep the (masked tokens x prototypes) logits recomputes
    them from the bottleneck features in each extra pass: the prototype layer's matmul, 2 *
    bottleneck * prototypes per masked token, on the expected masked tokens of the image's 2 global
    crops. Not part of train_flops_per_image's totals: the caller adds it where it applies.
    """
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    model_cfg = recipe.model_config(cfg)
    ibot = model_cfg.ibot_head or model_cfg.dino_head
    masked = 2 * expected_masked_tokens_per_image(cfg)
    return float(passes * masked * 2 * ibot.bottleneck_dim * ibot.out_dim)


def global_attention_flops_per_image(cfg: Any, group_size: int | None = None) -> dict[str, float]:
    """Executed FLOPs per image of the attention matmuls (q k^T and p v) on the 2 global crops.

    {"teacher_forward", "student_forward", "executed"}: executed = teacher forward + 3x the student
    forward on its kept rows. A fused attention kernel (Pallas splash on TPU) hides these from the
    compiled program's matmul count, so a comparison of that count with train_flops_per_image's
    executed total takes them out first; under remat the kernel's forward runs again in the backward
    pass (+ student_forward), also unseen.
    """
    vit = recipe.model_config(cfg).backbone
    b = group_size_of(cfg, group_size)
    g = cfg.crops.global_crops_size
    tokens = 1 + vit.num_register_tokens + (g // vit.patch_size) ** 2
    per_crop = vit.depth * 4 * tokens * tokens * vit.embed_dim
    teacher = 2.0 * per_crop
    student = teacher * kept_rows(vit, 2 * b) / (2 * b)
    return {"teacher_forward": teacher, "student_forward": student, "executed": teacher + BACKWARD_FACTOR * student}


# --- throughput and MFU ----------------------------------------------------------------------
# Peak FLOP/s per chip: chexfound_jax.hardware.peak_flops (the one table of chip figures).


def throughput_metrics(
    images_per_step: int,
    flops_per_image: float,
    step_time_s: float,
    num_devices: int,
    peak: float | None,
    *,
    nominal_flops_per_image: float | None = None,
) -> dict[str, float]:
    """{"images_per_s", "tflops_per_s_per_device", "mfu"} of one step time, and with a nominal count
    also {"tflops_per_s_per_device_nominal", "mfu_nominal"}.

    flops_per_image is what the step executes (train.flops' "executed_total": subset drop path
    skips rows), so "mfu" is the chip's real utilisation; the nominal count ("total": every row
    through every block) gives the *_nominal keys, for comparison with accountings that ignore the
    skipped rows. images_per_step is the global batch and num_devices all devices of the job, so
    the FLOP/s are per device. MFU is a fraction of `peak` (FLOP/s per device), left out when peak
    is None, so a metrics dict never carries a None.
    """
    if step_time_s <= 0 or num_devices <= 0:
        raise ValueError(f"step_time_s and num_devices must be positive, got {step_time_s}, {num_devices}")
    images_per_s = images_per_step / step_time_s
    out = {"images_per_s": images_per_s}
    counts = {"": flops_per_image}
    if nominal_flops_per_image is not None:
        counts["_nominal"] = nominal_flops_per_image
    for suffix, per_image in counts.items():
        flops_per_device = per_image * images_per_s / num_devices
        out[f"tflops_per_s_per_device{suffix}"] = flops_per_device / 1e12
        if peak:
            out[f"mfu{suffix}"] = flops_per_device / peak
    return out
