"""PyTorch checkpoints <-> chexfound_jax parameters, strict on every key.

The official loaders are non-strict and silently keep random weights for a misnamed key; here
a missing, unknown or mis-shaped key is a ConversionError that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from chexfound_jax.convert import layouts
from chexfound_jax.convert.infer import infer_head_config, infer_vit_config
from chexfound_jax.convert.layouts import ConversionError
from chexfound_jax.models.heads import abstract_head_params
from chexfound_jax.models.model import HEAD_NAMES, ModelConfig
from chexfound_jax.models.vit import abstract_vit_params

SOURCES = ("teacher", "student")
_IGNORED_MODEL_KEYS = ("dino_loss.center", "ibot_patch_loss.center")  # unused with Sinkhorn-Knopp


def unwrap(obj: Mapping[str, Any], source: str = "teacher") -> tuple[dict[str, np.ndarray], str]:
    """The flat state dict of one model inside a checkpoint object, and the key prefix it had.

    Handles {"teacher": sd} (teacher_checkpoint.pth), {"model": sd} and flat `teacher.* / student.*`
    dicts (model_checkpoint.pth; `source` picks one), and bare dicts (hub, timm, safetensors).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if isinstance(obj.get("teacher"), Mapping):
        return _flat(obj["teacher"], "teacher."), "teacher."
    if isinstance(obj.get("model"), Mapping):
        obj = _flat(obj["model"], "model.")
    else:
        obj = _flat(obj, "")
    if any(k.startswith(("teacher.", "student.")) for k in obj):
        other = SOURCES[1 - SOURCES.index(source)]
        picked = {}
        for key, value in obj.items():
            if key.startswith(source + "."):
                picked[key[len(source) + 1 :]] = value
            elif not key.startswith(other + ".") and key not in _IGNORED_MODEL_KEYS:
                raise ConversionError(f"unknown key {key!r} in a model_checkpoint layout")
        if not picked:
            raise ConversionError(f"no {source}.* keys in the checkpoint")
        return picked, source + "."
    return obj, ""


def _flat(sd: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    for key, value in sd.items():
        if not hasattr(value, "shape"):
            raise ConversionError(f"key {where}{key!r} is a {type(value).__name__}, not a tensor")
    return dict(sd)


def import_state_dict(
    obj: Mapping[str, Any], *, source: str = "teacher", num_heads: int | None = None
) -> tuple[ModelConfig, dict]:
    """Any supported checkpoint object -> (ModelConfig inferred from shapes, numpy params)."""
    sd, prefix = unwrap(obj, source)
    heads: dict[str, dict] = {}
    if any(k.startswith("backbone.") for k in sd):
        backbone = {}
        for key, value in sd.items():
            head, _, rest = key.partition(".")
            if head == "backbone":
                backbone[rest] = value
            elif head in HEAD_NAMES:
                heads.setdefault(head, {})[rest] = value
            else:
                raise ConversionError(f"unknown key {prefix + key!r}")
        prefix += "backbone."
        is_timm = False
    else:
        backbone = sd
        is_timm = "reg_token" in sd or ("mask_token" not in sd and "cls_token" in sd)
    backbone, file_key = layouts.unchunk_blocks(backbone, prefix)
    if is_timm:
        backbone = layouts.timm_to_hub(backbone)
        describe = lambda k: repr(prefix + layouts.timm_key(k)) + " (timm layout)"
    else:
        describe = lambda k: repr(prefix + file_key(k))
    vit = infer_vit_config(backbone, num_heads=num_heads, where=prefix)
    params = {"backbone": layouts.hub_to_backbone(backbone, abstract_vit_params(vit), describe)}
    head_cfgs = {}
    for name, head_sd in heads.items():
        where = prefix.replace("backbone.", f"{name}.")
        head_cfgs[name] = infer_head_config(head_sd, where=where)
        abstract = abstract_head_params(head_cfgs[name])
        params[name] = layouts.torch_to_head(head_sd, abstract, lambda k, w=where: repr(w + k))
    return ModelConfig(backbone=vit, **head_cfgs), params


def export_state_dict(
    cfg: ModelConfig, params: Mapping, layout: str = "chexfound", *, block_chunks: int = layouts.BLOCK_CHUNKS
) -> dict[str, np.ndarray]:
    """Flat torch-layout state dict (numpy). Heads are included in the chexfound layout only."""
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"layout must be one of {layouts.LAYOUTS}, got {layout!r}")
    params = {k: _to_numpy_tree(v) for k, v in params.items()}
    hub = layouts.backbone_to_hub(params["backbone"])
    if layout == "hub":
        return hub
    if layout == "timm":
        return layouts.hub_to_timm(hub)
    out = {f"backbone.{k}": v for k, v in layouts.chunk_blocks(hub, cfg.backbone.depth, block_chunks).items()}
    for name in cfg.heads():
        out.update({f"{name}.{k}": v for k, v in layouts.head_to_torch(params[name]).items()})
    return out


def _to_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)
