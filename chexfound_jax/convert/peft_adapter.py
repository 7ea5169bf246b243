"""LoRA adapters <-> the Hugging Face peft checkpoint the official evaluation's LoRA option saves.

`get_peft_model(vit, LoraConfig(...)).save_pretrained(dir)` writes `adapter_model.safetensors` with keys

    base_model.model.<module>.lora_A.weight     (r, in)       Linear;  (r, C, p, p) patch embedding
    base_model.model.<module>.lora_B.weight     (out, r)      Linear;  (out, r, 1, 1) patch embedding
    base_model.model.<module>.base_layer.bias   (out,)        bias="lora_only": each adapted layer's bias

(bias="all" adds every other bias under its plain name) and `adapter_config.json` with r, lora_alpha,
target_modules, lora_dropout and bias. <module> is the official module name: `blocks.{c}.{i}.attn.qkv` with
the official block chunking (block_chunks 4 in the evaluation's backbone), `blocks.{i}.attn.qkv` without.
tests/data/peft_lora_layout.json holds what peft 0.21.2 writes for the tiny golden backbone. Module names come
from layouts.backbone_rule (the name of the layer's weight), so an adapter and its backbone share one mapping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from chexfound_jax.convert import layouts
from chexfound_jax.convert.layouts import ConversionError
from chexfound_jax.models.lora import LORA_LEAVES, LoRAConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
# LoraConfig fields whose other values change what the adapter computes or where it sits: written with these
# values, refused on import (peft versions without a field wrote its default behaviour)
_DEFAULTS = {
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
}
_REFUSED = {**_DEFAULTS, "exclude_modules": None, "lora_bias": False, "use_qalora": False, "target_parameters": None}


def adapter_config(cfg: LoRAConfig) -> dict[str, Any]:
    """The adapter_config.json of `cfg`: peft's LoraConfig fields that define the adapter (the rest default)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": cfg.bias,
        "init_lora_weights": True,
        "inference_mode": True,
        **_DEFAULTS,
    }


def lora_config(config: Mapping[str, Any]) -> LoRAConfig:
    """The LoRAConfig of an adapter_config.json; refuses what would change the adapter's function here."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{CONFIG_NAME}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, default in _REFUSED.items():
        value = config.get(field)
        if value is not None and value != default:
            raise ConversionError(f"{CONFIG_NAME}: {field}={value!r} is not supported (only {default!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ConversionError(f"{CONFIG_NAME}: target_modules must be a list of module names, got {targets!r}")
    try:
        return LoRAConfig(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=tuple(targets),
            bias=config.get("bias", "none"),
        )
    except KeyError as e:
        raise ConversionError(f"{CONFIG_NAME}: no {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{CONFIG_NAME}: {e}") from e


def _adapter_rule(path: tuple) -> tuple[str, Callable, Callable]:
    """Torch key (hub block numbering, no prefix) and to/from-torch transforms of one adapter leaf."""
    module = path[:-1]
    weight, _, _ = layouts.backbone_rule((*module, "kernel"))
    name = weight.removesuffix(".weight")
    if path[-1] == "bias":
        return f"{name}.base_layer.bias", _identity, _identity
    conv = weight == "patch_embed.proj.weight"
    if path[-1] == "lora_a":
        # (in, r) -> (r, in); the patch embedding's (p, p, C, r) -> (r, C, p, p), as layouts' conv kernels
        return (
            f"{name}.lora_A.weight",
            (_conv_a_to_torch if conv else _transpose),
            (_conv_a_from_torch if conv else _transpose),
        )
    return (
        f"{name}.lora_B.weight",
        (_conv_b_to_torch if conv else _transpose),
        (_conv_b_from_torch if conv else _transpose),
    )


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _conv_a_to_torch(x):
    return x.transpose(3, 2, 0, 1)


def _conv_a_from_torch(x):
    return x.transpose(2, 3, 1, 0)


def _conv_b_to_torch(x):  # (r, D) -> (D, r, 1, 1)
    return x.T[:, :, None, None]


def _conv_b_from_torch(x):
    return x[:, :, 0, 0].T


def adapter_paths(abstract: Mapping, cfg: LoRAConfig) -> list[tuple]:
    """Paths of the leaves an adapter file holds, in an adapted backbone's (abstract) pure dict: every
    lora_a / lora_b, and the biases `cfg.bias` trains (each adapted layer's for lora_only, all for all)."""
    leaves = [path for path, _ in layouts.flatten_with_paths(abstract)]
    adapted = {path[:-1] for path in leaves if path[-1] == "lora_a"}
    if not adapted:
        raise ValueError("the parameters hold no LoRA adapter (lora_a leaves): adapt the backbone first")
    return [
        path
        for path in leaves
        if path[-1] in LORA_LEAVES
        or (path[-1] == "bias" and (cfg.bias == "all" or (cfg.bias == "lora_only" and path[:-1] in adapted)))
    ]


def _torch_key(path: tuple, adapted: set[tuple]) -> tuple[str, Callable, Callable]:
    if path[-1] == "bias" and path[:-1] not in adapted:  # bias="all": a layer without adapter keeps its name
        return layouts.backbone_rule(path)
    return _adapter_rule(path)


def export_adapter(
    params: Mapping, cfg: LoRAConfig, *, block_chunks: int = layouts.BLOCK_CHUNKS, prefix: str = PREFIX
) -> dict[str, np.ndarray]:
    """The state dict save_pretrained writes for an adapted backbone's pure parameter dict (numpy arrays).

    `block_chunks`: the block numbering of the backbone the adapter is for (4: the official evaluation's
    chunked backbone, `blocks.{c}.{i}`; 0: flat `blocks.{i}`, hub and timm-style backbones).
    """
    paths = adapter_paths(params, cfg)
    adapted = {p[:-1] for p in paths if p[-1] == "lora_a"}
    values = dict(layouts.flatten_with_paths(params))
    flat = {}
    for path in paths:
        name, to_torch, _ = _torch_key(path, adapted)
        flat[name] = np.asarray(to_torch(np.asarray(values[path])))
    depth = _depth(params)
    chunked = layouts.chunk_blocks(flat, depth, block_chunks) if block_chunks else flat
    return {prefix + k: v for k, v in chunked.items()}


def _depth(params: Mapping) -> int:
    return len(params.get("blocks", {}))


def import_adapter(sd: Mapping[str, Any], cfg: LoRAConfig, abstract: Mapping, *, prefix: str = PREFIX) -> dict:
    """The adapter leaves of an adapter state dict as a nested dict shaped like `abstract` (an adapted
    backbone's pure dict, e.g. models.lora.abstract_lora_params): lora_a / lora_b and the trained biases.

    Strict on keys and shapes; chunked and flat block numbering are both read, and a bias saved under the
    layer's own name (`<module>.bias`, as peft before 0.7 wrote it) is read like `<module>.base_layer.bias`.
    """
    unprefixed = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            raise ConversionError(f"adapter key {key!r} does not start with {prefix!r}")
        unprefixed[key[len(prefix) :]] = value
    flat, file_key = layouts.unchunk_blocks(unprefixed, prefix)
    paths = adapter_paths(abstract, cfg)
    adapted = {p[:-1] for p in paths if p[-1] == "lora_a"}
    shapes = dict(layouts.flatten_with_paths(abstract))
    tree: dict = {}
    seen = set()
    for path in paths:
        name, to_torch, from_torch = _torch_key(path, adapted)
        key = name if name in flat else _legacy_bias(name, flat)
        if key is None:
            raise ConversionError(f"missing adapter key {prefix + file_key(name)!r}")
        seen.add(key)
        expected = tuple(to_torch(np.empty(shapes[path].shape, np.bool_)).shape)
        value = flat[key]
        if tuple(value.shape) != expected:
            raise ConversionError(
                f"adapter key {prefix + file_key(key)!r} has shape {tuple(value.shape)}, expected {expected}"
            )
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.asarray(from_torch(np.asarray(value)))
    unknown = [k for k in flat if k not in seen]
    if unknown:
        raise ConversionError(
            f"unknown adapter key {prefix + file_key(unknown[0])!r} ({len(unknown)} unknown in all; "
            f"target_modules {list(cfg.target_modules)}, bias {cfg.bias!r})"
        )
    return tree


def _legacy_bias(name: str, flat: Mapping) -> str | None:
    old = re.sub(r"\.base_layer\.bias$", ".bias", name)
    return old if old != name and old in flat else None


def write_adapter(
    directory: str | epath.PathLike, params: Mapping, cfg: LoRAConfig, *, block_chunks: int = layouts.BLOCK_CHUNKS
) -> None:
    """Writes adapter_model.safetensors and adapter_config.json, the files PeftModel.from_pretrained reads."""
    from safetensors.numpy import save

    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: np.ascontiguousarray(v) for k, v in export_adapter(params, cfg, block_chunks=block_chunks).items()}
    (directory / WEIGHTS_NAME).write_bytes(save(sd, metadata={"format": "pt"}))
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config(cfg), indent=2, sort_keys=True) + "\n")


def read_adapter(directory: str | epath.PathLike) -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """(LoRAConfig, state dict) of a peft adapter directory; import_adapter turns the state dict into leaves."""
    from safetensors.numpy import load

    directory = epath.Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} not found")
    cfg = lora_config(json.loads((directory / CONFIG_NAME).read_text()))
    sd = dict(load((directory / WEIGHTS_NAME).read_bytes()))
    return cfg, sd
