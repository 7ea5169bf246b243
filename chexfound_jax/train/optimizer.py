"""The student optimiser (official train/train.py, utils/param_groups.py): per-module clipping, then torch-style AdamW.

The official code builds one torch param group per parameter with an lr multiplier (layer-wise
decay x patch-embed multiplier), a weight-decay multiplier (0 for biases, norms and LayerScale) and
an is_last_layer flag (the DINO/iBOT prototypes, which follow the frozen-at-start lr schedule).
Here those are static pytrees next to the parameters, and the schedules are read at the optimiser's
own step count, so a restored optimiser state resumes every schedule where it stopped.

Update for a leaf p with gradient g at step t (torch AdamW; the first step uses lr(0), which is 0):

  g <- g * min(1, clip / (||g_module|| + 1e-6))      separately for backbone, dino_head, ibot_head
  p <- p - lr_t * lr_mult * (adam(g) + wd_t * wd_mult * p)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from chexfound_jax.ssl.schedules import Schedule, Schedules

PATCH_EMBED_LR_MULT = 0.2
CLIP_GRAD = 3.0
# Official names (ssl_default_config.yaml, `optim:`) and CheXFound's values.
OPTIM_DEFAULTS = {
    "clip_grad": CLIP_GRAD,
    "adamw_beta1": 0.9,
    "adamw_beta2": 0.999,
    "adamw_eps": 1e-8,  # torch's default; not in the yaml
    "layerwise_decay": 1.0,
    "patch_embed_lr_mult": PATCH_EMBED_LR_MULT,
}
# Tokens that sit before block 0 for layer-wise decay (layer_id 0).
_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


class Multipliers(NamedTuple):
    """Per-leaf trees with the structure of the parameters."""

    lr: Any  # float: layer-wise decay x patch-embed multiplier
    wd: Any  # float, 0.0 or 1.0
    is_last_layer: Any  # bool: uses the last-layer lr schedule


def _names(path: jax.tree_util.KeyPath) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _layer_id(names: tuple[str, ...], num_layers: int) -> int:
    """DINOv2's get_vit_lr_decay_rate: 0 for embeddings/tokens, i + 1 for block i, else L + 1."""
    if names[0] != "backbone":
        return num_layers + 1  # heads are separate submodules with no blocks: multiplier rate ** 0
    if any(n in _EMBED_NAMES for n in names):
        return 0
    if "blocks" in names:
        return int(names[names.index("blocks") + 1]) + 1
    return num_layers + 1


def param_multipliers(
    params: Any,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT,
    layerwise_decay: float = 1.0,
    num_layers: int | None = None,
) -> Multipliers:
    """The official per-parameter groups, keyed by our path names (works on abstract trees).

    Torch-name rules translated: wd 0 for a leaf named "bias", any path part containing "norm"
    (LayerNorm scale and bias) or "gamma" (LayerScale); tokens, pos_embed and the weight-norm g / v
    keep decay. lr x patch_embed_lr_mult on patch_embed.*; lr x rate ** (L + 1 - layer_id) on the
    backbone only. `num_layers` defaults to the number of backbone blocks.
    """
    if num_layers is None:
        num_layers = len(params.get("backbone", {}).get("blocks", {})) if isinstance(params, Mapping) else 0

    def lr_mult(path, _):
        names = _names(path)
        mult = layerwise_decay ** (num_layers + 1 - _layer_id(names, num_layers))
        return mult * patch_embed_lr_mult if "patch_embed" in names else mult

    def wd_mult(path, _):
        names = _names(path)
        exempt = names[-1] == "bias" or any("norm" in n or "gamma" in n for n in names)
        return 0.0 if exempt else 1.0

    def is_last(path, _):
        return "last_layer" in _names(path)

    tmap = jax.tree_util.tree_map_with_path
    return Multipliers(tmap(lr_mult, params), tmap(wd_mult, params), tmap(is_last, params))


def clip_by_module_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """torch clip_grad_norm_ on each top-level subtree: g * min(1, max_norm / (||g|| + eps))."""

    def clip(tree):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(tree) + eps))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)

    def update_fn(updates, state, params=None):
        del params
        if not isinstance(updates, Mapping):
            raise TypeError("clip_by_module_norm expects a dict of modules (backbone, dino_head, ...)")
        return {name: clip(module) for name, module in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_param_lr(lr: Schedule, last_layer_lr: Schedule, mults: Multipliers) -> optax.GradientTransformation:
    """Multiplies each update by -schedule(count) * lr_mult, the schedule chosen per leaf."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lrs = (lr(state.count), last_layer_lr(state.count))

        def scale(u, mult, last):
            return (-lrs[bool(last)] * mult).astype(u.dtype) * u

        updates = jax.tree.map(scale, updates, mults.lr, mults.is_last_layer)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _cfg(cfg: Mapping[str, Any] | Any | None, name: str) -> Any:
    return cfg[name] if cfg is not None and name in cfg else OPTIM_DEFAULTS[name]


def make_optimizer(
    params_like: Any, schedules: Schedules, cfg: Mapping[str, Any] | Any | None = None
) -> optax.GradientTransformation:
    """The student optimiser; `cfg` uses the official `optim` names (OPTIM_DEFAULTS fill the gaps).

    With lr 0 (the frozen last layer) a leaf does not move, decay included, while its Adam moments
    still update, as in torch.
    """
    mults = param_multipliers(params_like, _cfg(cfg, "patch_embed_lr_mult"), _cfg(cfg, "layerwise_decay"))
    decay_mask = jax.tree.map(bool, mults.wd)  # multipliers are 0 or 1, so a mask is exact
    clip = _cfg(cfg, "clip_grad")
    return optax.chain(
        clip_by_module_norm(clip) if clip else optax.identity(),  # official: `if clip_grad:`
        optax.scale_by_adam(_cfg(cfg, "adamw_beta1"), _cfg(cfg, "adamw_beta2"), _cfg(cfg, "adamw_eps")),
        optax.add_decayed_weights(schedules.wd, mask=decay_mask),
        scale_by_param_lr(schedules.lr, schedules.last_layer_lr, mults),
    )
