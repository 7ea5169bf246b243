"""LoRA on a built ViT backbone, as the official evaluation's Hugging Face peft wrapper does it.

The official CheXFound evaluation (eval/classification/linear_glori.py, LoRA option) wraps the backbone with
`get_peft_model(vit, LoraConfig(r=16, lora_alpha=16, target_modules=["qkv", "proj"], lora_dropout=0.1,
bias="lora_only"))`. peft adapts every Linear / Conv2d whose module name is a target or ends with "." + a
target, so "proj" takes the patch embedding's convolution (`patch_embed.proj`) as well as `attn.proj`.
`add_lora` does the same to a VisionTransformer in place: each matched layer becomes an adapted layer that
keeps the base kernel and bias variables (the same objects, so the frozen weights exist once and their
state paths do not change) and adds

    y = W x + b + (alpha / r) * B(A(dropout(x)))

with A (in, r) drawn as peft draws it (kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))) and B zero,
so an untrained adapter returns the base output exactly. A and B are `nnx.LoRAParam`s (a subclass of
nnx.Param): an nnx filter on that type selects them for the optimiser, and they carry logical axes derived
from the base kernel's ((in_axis, None) and (None, out_axis)) so FSDP rules shard them like the base.
Dropout is active only when the forward pass is given a training key (VisionTransformer.last_blocks /
forward_features with `rng`).

flax's own nnx.LoRA has neither the alpha/r scale nor dropout, and the arguments that set its variables'
metadata are recent; the layers here reuse its variable type only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from chexfound_jax.models import layers
from chexfound_jax.models.build import model_from_params
from chexfound_jax.models.vit import PatchEmbed, VisionTransformer, ViTConfig

BIAS_MODES = ("none", "lora_only", "all")  # peft's LoraConfig.bias
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """An adapter's settings; the defaults are the official evaluation's LoraConfig.

    `target_modules` are PyTorch module names or name suffixes, matched as peft matches them against the
    official module tree (blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.mlp.w12 / w3 or fc1 / fc2,
    patch_embed.proj); a set, as peft keeps it, stored sorted. `bias`: which biases train with the adapter
    ("lora_only": those of the adapted layers).
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("qkv", "proj")
    bias: str = "lora_only"

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            raise ValueError(f"LoRA target_modules must be a list of module names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRA bias {self.bias!r} is not one of {BIAS_MODES}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")

    @property
    def scale(self) -> float:
        """peft's `scaling`: lora_alpha / r (no rsLoRA)."""
        return self.alpha / self.rank

    def targets(self, module_name: str) -> bool:
        """Whether peft adapts the module of this PyTorch name (exact name or "." + suffix)."""
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRAConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields: {sorted(unknown)}")
        return cls(**d)


def _lora_params(rngs: nnx.Rngs, kernel: nnx.Variable, cfg: LoRAConfig) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """A (in..., r) and B (r, out) for a kernel (in..., out): A ~ U(+-1/sqrt(fan_in)), B = 0."""
    *in_shape, out = kernel.shape
    axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
    fan_in = 1
    for n in in_shape:
        fan_in *= n
    a = layers.torch_linear_uniform(fan_in)(rngs.params(), (*in_shape, cfg.rank), jnp.float32)
    b = jnp.zeros((cfg.rank, out), jnp.float32)
    return (
        nnx.LoRAParam(a, logical_axes=(*axes[:-1], None)),
        nnx.LoRAParam(b, logical_axes=(None, axes[-1])),
    )


def _delta(x: jax.Array, a: nnx.Variable, b: nnx.Variable, scale: float, rate: float, rng, dtype) -> jax.Array:
    """scale * B(A(dropout(x))) for x (..., fan_in) and A stored as (in..., r)."""
    x = x.astype(dtype)
    if rng is not None and rate > 0.0:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(dtype)
    a = a[...].reshape(-1, a.shape[-1]).astype(dtype)
    return (jnp.dot(jnp.dot(x, a), b[...].astype(dtype)) * scale).astype(dtype)


class LoRALinear(layers.Linear):
    """A layers.Linear plus a low-rank update; `kernel` and `bias` are the base layer's own variables."""

    def __init__(self, base: layers.Linear, cfg: LoRAConfig, *, rngs: nnx.Rngs):
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        self.lora_a, self.lora_b = _lora_params(rngs, base.kernel, cfg)
        self.scale = cfg.scale
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: the dropout key (training); None: no dropout."""
        delta = _delta(x, self.lora_a, self.lora_b, self.scale, self.dropout, rng, self.dtype)
        return super().__call__(x) + delta


class LoRAPatchEmbed(PatchEmbed):
    """The patch embedding plus peft's LoRA Conv2d: A a (p, p, C, r) convolution with the patch stride, B 1x1."""

    def __init__(self, base: PatchEmbed, cfg: LoRAConfig, *, rngs: nnx.Rngs):
        self.kernel = base.kernel
        self.bias = base.bias
        self.patch_size = base.patch_size
        self.dtype = base.dtype
        self.lora_a, self.lora_b = _lora_params(rngs, base.kernel, cfg)
        self.scale = cfg.scale
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        # dropout on the pixels, as peft drops the conv input; each kept pixel lies in exactly one patch
        delta = _delta(self.patches(x), self.lora_a, self.lora_b, self.scale, self.dropout, rng, self.dtype)
        return super().__call__(x) + delta


ADAPTED = (LoRALinear, LoRAPatchEmbed)


def module_name(path: Sequence[Any]) -> str:
    """The official PyTorch module name of the layer at a JAX path (flat block numbering).

    Same names as convert/layouts.backbone_rule gives the layer's weight (models sit below convert and
    cannot import it; tests/test_lora.py checks the two agree).
    """
    parts = [str(p) for p in path]
    return "patch_embed.proj" if parts == ["patch_embed"] else ".".join(parts)


def adaptable_layers(model: VisionTransformer) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) of every layer LoRA can adapt: the patch embedding and each Linear, in graph order."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, PatchEmbed | layers.Linear):
            found.append((tuple(path), node))
    return found


def add_lora(model: VisionTransformer, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> VisionTransformer:
    """Adapts, in place, every layer whose module name `cfg` targets (peft's get_peft_model); returns `model`.

    Raises if a target matches no layer (peft does too) or the model already has adapters. Call it where the
    model was built (inside `jax.set_mesh` for a sharded model, or under nnx.eval_shape for shapes only).
    """
    matched: set[str] = set()
    for path, layer in adaptable_layers(model):
        if isinstance(layer, ADAPTED):
            raise ValueError(f"{module_name(path)} already has a LoRA adapter")
        name = module_name(path)
        if not cfg.targets(name):
            continue
        matched.update(t for t in cfg.target_modules if name == t or name.endswith("." + t))
        wrapper = LoRAPatchEmbed if isinstance(layer, PatchEmbed) else LoRALinear
        _set_child(model, path, wrapper(layer, cfg, rngs=rngs))
    missing = [t for t in cfg.target_modules if t not in matched]
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no Linear or patch-embedding layer of the backbone")
    return model


def _set_child(model: nnx.Module, path: tuple, layer: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = layer
    else:
        setattr(parent, path[-1], layer)


def lora_model(vit_cfg: ViTConfig, params: Mapping, cfg: LoRAConfig, *, seed: int = 0) -> VisionTransformer:
    """A backbone holding `params` (the plain backbone's pure dict) with fresh adapters from `seed`."""
    return add_lora(model_from_params(vit_cfg, params), cfg, rngs=nnx.Rngs(seed))


def load_params(model: nnx.Module, params: Mapping) -> nnx.Module:
    """Sets the parameters a (partial) pure dict holds, e.g. an imported adapter's leaves; returns `model`."""
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(jax.device_put(dict(params)))
    nnx.update(model, state)
    return model


def abstract_lora_params(vit_cfg: ViTConfig, cfg: LoRAConfig) -> dict:
    """Shapes/dtypes of an adapted backbone's parameters (plain leaves and lora_a / lora_b) as a pure dict."""
    model = nnx.eval_shape(lambda: add_lora(VisionTransformer(vit_cfg, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    return nnx.state(model, nnx.Param).to_pure_dict()


def merge_params(params: Mapping, scale: float) -> dict:
    """Plain backbone parameters of an adapted backbone's pure dict: every adapted kernel becomes
    W + scale * A B, and the lora leaves go. The result loads into the plain VisionTransformer and exports
    through convert/ like any backbone."""
    if "lora_a" in params:
        out = {k: v for k, v in params.items() if k not in LORA_LEAVES}
        delta = jnp.tensordot(params["lora_a"], params["lora_b"], axes=1, precision=jax.lax.Precision.HIGHEST)
        out["kernel"] = (params["kernel"] + scale * delta).astype(params["kernel"].dtype)
        return out
    return {k: merge_params(v, scale) if isinstance(v, Mapping) else v for k, v in params.items()}


def merge(model: VisionTransformer) -> VisionTransformer:
    """A plain VisionTransformer computing what the adapted `model` computes without dropout."""
    scales = {layer.scale for _, layer in adaptable_layers(model) if isinstance(layer, ADAPTED)}
    if len(scales) > 1:
        raise ValueError(f"adapters with different scales {sorted(scales)}; merge each with merge_params")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    return model_from_params(model.config, merge_params(params, scales.pop()) if scales else params)


def adapted_module_names(params: Mapping, prefix: tuple = ()) -> list[str]:
    """Official module names of the adapted layers in a pure parameter dict (those holding lora_a)."""
    names = []
    for key, value in params.items():
        if isinstance(value, Mapping):
            if "lora_a" in value:
                names.append(module_name((*prefix, key)))
            else:
                names.extend(adapted_module_names(value, (*prefix, key)))
    return names
