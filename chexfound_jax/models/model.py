"""The whole pretrained model: backbone plus optional DINO / iBOT heads, as one config and tree."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flax import nnx
from jax.sharding import PartitionSpec

from chexfound_jax.models.heads import DINOHead, HeadConfig, abstract_head_params
from chexfound_jax.models.vit import VisionTransformer, ViTConfig, abstract_vit_params

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


def _logical_tree(module: nnx.Module) -> dict:
    tree: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = PartitionSpec(*var.get_metadata()["logical_axes"])
    return tree


def logical_axes(cfg: ModelConfig) -> dict:
    """The tree of abstract_params(cfg) with each leaf the PartitionSpec of its logical axis names."""
    tree = {"backbone": _logical_tree(nnx.eval_shape(lambda: VisionTransformer(cfg.backbone, rngs=nnx.Rngs(0))))}
    for name, head in cfg.heads().items():
        tree[name] = _logical_tree(nnx.eval_shape(lambda h=head: DINOHead(h, rngs=nnx.Rngs(0))))
    return tree
