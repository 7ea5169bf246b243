"""JAX parameter trees <-> PyTorch state dicts in the CheXFound / DINOv2 / timm layouts.

One rule maps each JAX parameter path to its torch key and tensor layout; export applies it
forwards, import backwards after checking the torch dict key by key against what the config
expects. Layouts (the official train/train.py writes the first, utils/utils.py:load_pretrained_weights reads it):

- "chexfound": `backbone.*` with chunked `blocks.{c}.{i}` keys plus `dino_head.*` / `ibot_head.*`,
  the teacher_checkpoint.pth layout (wrapped as {"teacher": ...} when written as .pth);
- "hub": a bare DINOv2 torch.hub backbone dict with flat `blocks.{i}` keys;
- "timm": timm's DINOv2 ViT (`reg_token`, class position folded into `cls_token`, no mask_token,
  `mlp.fc1/fc2` for the fused SwiGLU).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

LAYOUTS = ("chexfound", "hub", "timm")
HEADS = ("dino_head", "ibot_head")
BLOCK_CHUNKS = 4  # CheXFound's block_chunks: FSDP wrapping only, visible in key names

Array = Any
Rule = tuple[str, Callable[[Array], Array], Callable[[Array], Array]]


class ConversionError(ValueError):
    """A state dict that does not match the expected layout; the message names the key."""


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _conv_to_torch(x):  # (kh, kw, in, out) -> (out, in, kh, kw)
    return x.transpose(3, 2, 0, 1)


def _conv_from_torch(x):
    return x.transpose(2, 3, 1, 0)


def _column(x):  # weight-norm g: (K,) <-> (K, 1)
    return x.reshape(-1, 1)


def _flatten_g(x):
    return x.reshape(-1)


def backbone_rule(path: tuple[Any, ...]) -> Rule:
    """torch key (hub layout) and to/from-torch transforms of one backbone parameter."""
    *module, leaf = (str(p) for p in path)
    prefix = ".".join(module)
    if module == ["patch_embed"]:
        if leaf == "kernel":
            return "patch_embed.proj.weight", _conv_to_torch, _conv_from_torch
        return "patch_embed.proj.bias", _identity, _identity
    if leaf == "kernel":
        return f"{prefix}.weight", _transpose, _transpose
    if leaf == "scale":
        return f"{prefix}.weight", _identity, _identity
    return ".".join([*module, leaf]), _identity, _identity


def head_rule(path: tuple[Any, ...], nlayers: int) -> Rule:
    """torch key (inside `dino_head.`) and transforms of one DINOHead parameter."""
    parts = [str(p) for p in path]
    if parts[0] == "mlp":
        layer = "mlp" if nlayers == 1 else f"mlp.{2 * int(parts[1])}"
        if parts[-1] == "kernel":
            return f"{layer}.weight", _transpose, _transpose
        return f"{layer}.bias", _identity, _identity
    if parts[-1] == "g":
        return "last_layer.weight_g", _column, _flatten_g
    return "last_layer.weight_v", _transpose, _transpose


def flatten_with_paths(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """Leaves of a nested dict with their key paths, in sorted key order."""
    items = []
    for key in sorted(tree, key=lambda k: (isinstance(k, str), k)):
        value = tree[key]
        if isinstance(value, Mapping):
            items.extend(flatten_with_paths(value, (*prefix, key)))
        else:
            items.append(((*prefix, key), value))
    return items


def _set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Key order: PyTorch's module registration order, so exported files read like the official ones.

_TOP_ORDER = ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed", "blocks", "norm"]
_BLOCK_ORDER = ["norm1", "attn.qkv", "attn.proj", "ls1", "norm2", "mlp.fc1", "mlp.w12", "mlp.fc2", "mlp.w3", "ls2"]
_LEAF_ORDER = ["weight", "bias", "gamma", "weight_g", "weight_v"]


def _torch_sort_key(name: str) -> tuple:
    m = re.match(r"blocks\.(\d+)\.(.+)\.(\w+)$", name)
    if m:
        return (
            _TOP_ORDER.index("blocks"),
            int(m.group(1)),
            _BLOCK_ORDER.index(m.group(2)),
            _LEAF_ORDER.index(m.group(3)),
        )
    head, leaf = name.split(".")[0], name.split(".")[-1]
    return (_TOP_ORDER.index(head), 0, 0, _LEAF_ORDER.index(leaf) if leaf in _LEAF_ORDER else 0)


def _head_sort_key(name: str) -> tuple:
    m = re.match(r"mlp\.?(\d*)\.(\w+)$", name)
    if m:
        return (0, int(m.group(1) or 0), _LEAF_ORDER.index(m.group(2)))
    return (1, 0, _LEAF_ORDER.index(name.split(".")[-1]))


# ---------------------------------------------------------------------------------------------
# Backbone <-> hub dict


def backbone_to_hub(params: Mapping) -> dict[str, Array]:
    """JAX backbone params -> the flat DINOv2 hub state dict (arrays keep their type)."""
    out = {}
    for path, value in flatten_with_paths(params):
        name, to_torch, _ = backbone_rule(path)
        out[name] = to_torch(value)
    return {k: out[k] for k in sorted(out, key=_torch_sort_key)}


def hub_to_backbone(sd: Mapping[str, Array], abstract: Mapping, describe: Callable[[str], str] = repr) -> dict:
    """Hub state dict -> JAX backbone params shaped like `abstract`; strict on keys and shapes.

    `describe` renders a hub key as the user's file names it, for error messages.
    """
    return _import_tree(sd, abstract, backbone_rule, describe)


def head_to_torch(params: Mapping) -> dict[str, Array]:
    nlayers = len(params["mlp"])
    out = {}
    for path, value in flatten_with_paths(params):
        name, to_torch, _ = head_rule(path, nlayers)
        out[name] = to_torch(value)
    return {k: out[k] for k in sorted(out, key=_head_sort_key)}


def torch_to_head(sd: Mapping[str, Array], abstract: Mapping, describe: Callable[[str], str] = repr) -> dict:
    nlayers = len(abstract["mlp"])
    return _import_tree(sd, abstract, lambda p: head_rule(p, nlayers), describe)


def _import_tree(sd: Mapping[str, Array], abstract: Mapping, rule: Callable, describe: Callable[[str], str]) -> dict:
    expected = {}
    for path, spec in flatten_with_paths(abstract):
        name, to_torch, from_torch = rule(path)
        expected[name] = (path, tuple(to_torch(np.empty(spec.shape, np.bool_)).shape), from_torch)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ConversionError(f"missing key {describe(missing[0])} ({len(missing)} missing in all)")
    unknown = [k for k in sd if k not in expected]
    if unknown:
        raise ConversionError(f"unknown key {describe(unknown[0])} ({len(unknown)} unknown in all)")
    tree: dict = {}
    for name, (path, torch_shape, from_torch) in expected.items():
        value = sd[name]
        if tuple(value.shape) != torch_shape:
            raise ConversionError(f"key {describe(name)} has shape {tuple(value.shape)}, expected {torch_shape}")
        _set_path(tree, path, from_torch(value))
    return tree


# ---------------------------------------------------------------------------------------------
# Block chunking (chexfound layout) and timm


def chunk_blocks(sd: Mapping[str, Array], depth: int, chunks: int = BLOCK_CHUNKS) -> dict[str, Array]:
    """blocks.{i}.* -> blocks.{i // (depth // chunks)}.{i}.*, DINOv2's BlockChunk naming."""
    size = depth // chunks if chunks and depth % chunks == 0 else depth
    return {
        re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // size}.{m.group(1)}.", k): v
        for k, v in sd.items()
    }


def unchunk_blocks(sd: Mapping[str, Array], prefix: str = "") -> tuple[dict[str, Array], Callable[[str], str]]:
    """blocks.{c}.{i}.* -> blocks.{i}.*; flat keys pass through. Rejects a block in two chunks.

    Also returns a function giving the file's own (chunked) name of a flat key, for messages.
    """
    out: dict[str, Array] = {}
    chunk_of: dict[str, str] = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(\d+)\.(.*)$", key)
        if m:
            chunk, block, rest = m.groups()
            if chunk_of.setdefault(block, chunk) != chunk:
                raise ConversionError(
                    f"key {prefix + key!r}: block {block} appears in chunks {chunk_of[block]} and {chunk}"
                )
            key = f"blocks.{block}.{rest}"
        if key in out:
            raise ConversionError(f"key {prefix + key!r} appears twice (chunked and flat)")
        out[key] = value

    def file_key(key: str) -> str:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        return f"blocks.{chunk_of[m.group(1)]}.{key[len('blocks.') :]}" if m and m.group(1) in chunk_of else key

    return out, file_key


_TIMM_RENAMES = (("register_tokens", "reg_token"), (".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))


def timm_key(hub_key: str) -> str:
    """The timm name of a hub key (for messages about timm files)."""
    for old, new in _TIMM_RENAMES:
        hub_key = hub_key.replace(old, new)
    return hub_key


def hub_to_timm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's checkpoint_filter_fn for DINOv2, as a pure function: class position folded into
    cls_token, pos_embed without it, registers renamed, mask_token dropped, w12/w3 -> fc1/fc2."""
    out = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        if key == "cls_token":
            value = value + sd["pos_embed"][:, :1]
        elif key == "pos_embed":
            value = value[:, 1:]
        out[timm_key(key)] = value
    order = ["cls_token", "reg_token", "pos_embed"]
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else 3)}


def timm_to_hub(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of hub_to_timm with a zero class position and a zero mask_token (timm has none).

    The model function is unchanged: the class token's position is already inside cls_token.
    timm names both FFN kinds fc1/fc2; a fused SwiGLU is recognised by fc1 being twice as wide
    as fc2's input.
    """
    for key in ("cls_token", "pos_embed"):
        if key not in sd:
            raise ConversionError(f"missing key {key!r}")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    renames = _TIMM_RENAMES if swiglu else _TIMM_RENAMES[:1]
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(new, old)
        if key == "pos_embed":
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        out[key] = value
    cls = sd["cls_token"]
    out["mask_token"] = np.zeros(cls.shape[1:], cls.dtype)
    return out
