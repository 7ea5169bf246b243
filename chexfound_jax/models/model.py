"""The whole pretrained model: backbone plus optional DINO / iBOT heads, as one config and tree."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from chexfound_jax.models.heads import HeadConfig, abstract_head_params
from chexfound_jax.models.vit import ViTConfig, abstract_vit_params

HEAD_NAMES = ("dino_head", "ibot_head")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    dino_head: HeadConfig | None = None
    ibot_head: HeadConfig | None = None

    def heads(self) -> dict[str, HeadConfig]:
        return {name: getattr(self, name) for name in HEAD_NAMES if getattr(self, name) is not None}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = set(d) - {"backbone", *HEAD_NAMES}
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        heads = {name: HeadConfig.from_dict(d[name]) for name in HEAD_NAMES if d.get(name) is not None}
        return cls(backbone=ViTConfig.from_dict(d["backbone"]), **heads)


def abstract_params(cfg: ModelConfig) -> dict:
    """{"backbone": ..., "dino_head": ..., "ibot_head": ...} of ShapeDtypeStructs (heads if configured)."""
    tree = {"backbone": abstract_vit_params(cfg.backbone)}
    tree.update({name: abstract_head_params(head) for name, head in cfg.heads().items()})
    return tree
