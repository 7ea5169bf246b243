"""Model configs inferred from state-dict shapes, so importing needs no architecture flags."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from chexfound_jax.convert.layouts import ConversionError
from chexfound_jax.models.heads import HeadConfig
from chexfound_jax.models.vit import ViTConfig

DINOV2_HEAD_DIM = 64  # every DINOv2 size has 64-d heads; head count is not visible in shapes


def _need(sd: Mapping, key: str, where: str):
    if key not in sd:
        raise ConversionError(f"missing key {where + key!r}")
    return sd[key]


def infer_vit_config(sd: Mapping, *, num_heads: int | None = None, where: str = "") -> ViTConfig:
    """ViTConfig of a hub-layout backbone dict (flat `blocks.{i}` keys, class position in pos_embed)."""
    dim = _need(sd, "cls_token", where).shape[-1]
    out_ch, in_chans, patch, patch_w = _need(sd, "patch_embed.proj.weight", where).shape
    if patch != patch_w or out_ch != dim:
        raise ConversionError(f"key '{where}patch_embed.proj.weight' has shape {(out_ch, in_chans, patch, patch_w)}")
    num_pos = _need(sd, "pos_embed", where).shape[1] - 1
    grid = math.isqrt(num_pos)
    if grid * grid != num_pos:
        raise ConversionError(f"key '{where}pos_embed' has {num_pos} patch positions, not a square grid")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ConversionError(f"missing key '{where}blocks.0.norm1.weight' (no transformer blocks)")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn, hidden = "swiglufused", _need(sd, "blocks.0.mlp.w3.weight", where).shape[1]
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise ConversionError(f"missing key '{where}blocks.0.mlp.w12.weight' (or mlp.fc1.weight)")
    heads = num_heads or max(dim // DINOV2_HEAD_DIM, 1)
    cfg = ViTConfig(
        embed_dim=dim,
        depth=max(blocks) + 1,
        num_heads=heads,
        patch_size=patch,
        img_size=grid * patch,
        in_chans=in_chans,
        ffn_layer=ffn,
        num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in sd),
    )
    return cfg if cfg.hidden_dim == hidden else cfg.replace(ffn_hidden_dim=hidden)


def infer_head_config(sd: Mapping, *, where: str = "") -> HeadConfig:
    """HeadConfig of a DINOHead dict (keys without the `dino_head.` prefix)."""
    if "mlp.weight" in sd:  # nlayers == 1: a single Linear
        mlp = [sd["mlp.weight"]]
    else:
        mlp = [
            sd[k]
            for k in sorted((k for k in sd if re.fullmatch(r"mlp\.\d+\.weight", k)), key=lambda k: int(k.split(".")[1]))
        ]
    if not mlp:
        raise ConversionError(f"missing key '{where}mlp.0.weight'")
    return HeadConfig(
        in_dim=mlp[0].shape[1],
        out_dim=_need(sd, "last_layer.weight_g", where).shape[0],
        hidden_dim=mlp[0].shape[0] if len(mlp) > 1 else HeadConfig.hidden_dim,
        bottleneck_dim=mlp[-1].shape[0],
        nlayers=len(mlp),
    )
