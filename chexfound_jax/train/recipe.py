"""What a pretraining config implies: model configs and schedule hyper-parameters.

The batch layout the config implies is chexfound_jax/data/batch_layout.py (the input pipeline and the
train step both read it).
"""

from __future__ import annotations

from typing import Any

from chexfound_jax.models import HeadConfig, ModelConfig, ViTConfig, vit_config


def backbone_config(cfg: Any) -> ViTConfig:
    """The student backbone (drop path on); the teacher runs the same graph without an rng."""
    model = dict(cfg.model)
    return vit_config(model.pop("arch"), img_size=cfg.crops.global_crops_size, **model)


def head_config(head_cfg: Any, in_dim: int) -> HeadConfig:
    return HeadConfig(
        in_dim=in_dim,
        out_dim=head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
    )


def model_config(cfg: Any) -> ModelConfig:
    """Backbone + DINO head, plus an iBOT head when `ibot.separate_head` (else iBOT shares DINO's)."""
    backbone = backbone_config(cfg)
    ibot = head_config(cfg.ibot, backbone.embed_dim) if cfg.ibot.separate_head else None
    return ModelConfig(backbone=backbone, dino_head=head_config(cfg.dino, backbone.embed_dim), ibot_head=ibot)


def schedule_config(cfg: Any) -> dict[str, Any]:
    """The flat hyper-parameters Schedules.from_config reads."""
    return {**cfg.optim, **cfg.teacher, "global_batch_size": cfg.train.global_batch_size}
