"""Training the backbone with its head: full fine-tuning, LoRA or BitFit (`backbone.adapt`).

The official evaluation (eval/classification/linear_glori.py) keeps the backbone frozen for the GLoRI recipe and
offers `--fine-tune` (every backbone weight in its own AdamW parameter group, lr 1e-5), LoRA through peft and
BitFit. With the backbone frozen a whole lr grid of heads trains on one forward (probe.HeadBank); here the
backbone, or its adapters / biases (models/adapt.py), train jointly with one head, so the features are
computed with gradients on every step. Both share the cosine schedule without warmup and AdamW (weight decay
`train.weight_decay` on every trainable leaf, as the official single optimiser does); the backbone has its own
lr (`backbone.lr`), optionally decayed layer by layer (`backbone.layer_decay`, BEiT-style: embeddings get
decay^(depth + 1), block i decay^(depth - i), the final norm 1; not in the official code).

The backbone lives on the mesh by the same logical-axis rules as pretraining (`parallel.rules`; LoRA's A and B
take the axes of the kernel they adapt), its trainable leaves and their AdamW moments are part of the bank
state (so checkpoints resume exactly), and the frozen leaves stay in the environment's backbone state, which
prediction reads as it reads a frozen backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from chexfound_jax.errors import ConfigError
from chexfound_jax.eval.losses import head_loss
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization, cosine_factor
from chexfound_jax.models import adapt as adapt_lib
from chexfound_jax.models import lora as lora_lib
from chexfound_jax.models.build import model_from_params
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.models.vit import VisionTransformer, ViTConfig, remat_policy_name
from chexfound_jax.parallel import activations, sharding


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """What of the backbone trains and how (`backbone.*` of the evaluation config)."""

    mode: str = "frozen"
    lr: float = 1e-5  # the official --fine-tune backbone lr
    layer_decay: float = 1.0  # 1: none (the official code has none)
    drop_path_rate: float = 0.0  # the official evaluation backbone has none
    remat: bool | str = "none"
    lora: lora_lib.LoRAConfig = dataclasses.field(default_factory=lora_lib.LoRAConfig)
    seed: int = 0  # the adapters' initialisation

    @property
    def trains(self) -> bool:
        return self.mode != "frozen"


def adaptation(cfg: Any, training: bool = True) -> Adaptation:
    """The Adaptation of an evaluation config; a ConfigError naming the key for a value that cannot run.
    `training`: for a workflow that trains heads (not ood / predict, which read a trained one)."""
    b = cfg.backbone
    mode = str(b.get("adapt", "frozen"))
    if mode not in adapt_lib.MODES:
        raise ConfigError(f"backbone.adapt must be one of {adapt_lib.MODES}, got {mode!r}")
    for key in ("lr", "layer_decay", "drop_path_rate"):
        if key in b and not isinstance(b[key], int | float):
            raise ConfigError(f"backbone.{key} must be a number, got {b[key]!r}")
    lr, decay, dpr = float(b.get("lr", 1e-5)), float(b.get("layer_decay", 1.0)), float(b.get("drop_path_rate", 0.0))
    if not lr > 0:
        raise ConfigError(f"backbone.lr must be positive, got {lr}")
    if not 0 < decay <= 1:
        raise ConfigError(f"backbone.layer_decay must be in (0, 1], got {decay}")
    if not 0 <= dpr < 1:
        raise ConfigError(f"backbone.drop_path_rate must be in [0, 1), got {dpr}")
    remat = b.get("remat", False)
    try:
        remat_policy_name(remat)
    except ValueError as e:
        raise ConfigError(f"backbone.remat: {e}") from None
    raw = dict(b.get("lora", {}))
    try:
        lora = lora_lib.LoRAConfig.from_dict(
            {**raw, "target_modules": tuple(raw.get("target_modules", ("qkv", "proj")))}
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"backbone.lora: {e}") from None
    if training and mode != "frozen" and len(cfg.train.lrs) != 1:
        raise ConfigError(
            f"train.lrs: backbone.adapt={mode!r} trains one head lr with the backbone lr (backbone.lr), not a grid; "
            f"give one value, e.g. --config.train.lrs='(1e-3,)' (got {len(cfg.train.lrs)})"
        )
    return Adaptation(mode, lr, decay, dpr, remat, lora, int(cfg.train.seed))


def _variable_sharding(mesh: Mesh, rules: sharding.Rules):
    def place(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("logical_axes") or (None,) * var.ndim
        return var.replace(NamedSharding(mesh, sharding.logical_to_spec(tuple(axes), rules, mesh, var.shape)))

    return place


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class AdaptedFeatures(FrozenFeatures):
    """A backbone (LoRA-adapted for mode lora) sharded on the mesh by the rule table, its parameters split into
    the trainable leaves of the mode and the frozen rest. `state` is the whole state at the start; calling it
    (prediction) is FrozenFeatures' forward on whatever whole state it is given.

    `params=None` builds shapes only: `state` holds jax.ShapeDtypeStructs with their shardings, nothing is
    allocated (compiling the step for devices that are not there, as bench/finetune_step.py does)."""

    def __init__(self, vit_cfg: ViTConfig, params: dict | None, n_blocks: int, dtype: str, adapt: Adaptation,
                 mesh: Mesh, rules: Any):  # fmt: skip
        if not 1 <= n_blocks <= vit_cfg.depth:
            raise ValueError(f"n_last_blocks={n_blocks} must be in [1, {vit_cfg.depth}]")
        self.source_cfg = vit_cfg
        self.cfg = vit_cfg.replace(dtype=dtype, drop_path_rate=adapt.drop_path_rate, remat=adapt.remat)
        self.n_blocks, self.adapt, self.mesh = n_blocks, adapt, mesh
        self.rules = sharding.resolve_rules(rules)

        def adapted(model: nnx.Module) -> nnx.Module:
            if adapt.mode == "lora":
                lora_lib.add_lora(model, adapt.lora, rngs=nnx.Rngs(adapt.seed))
            return model

        with jax.set_mesh(mesh):
            if params is None:
                model = nnx.eval_shape(lambda: adapted(VisionTransformer(self.cfg, rngs=nnx.Rngs(0))))
            else:
                model = adapted(model_from_params(self.cfg, params))
        self.filter = adapt_lib.trainable_filter(adapt.mode, adapt.lora)
        self.graphdef, state = nnx.split(model)
        self.shardings = jax.tree.map(_variable_sharding(mesh, self.rules), state, is_leaf=_is_var)
        if params is None:
            self.state = sharding.with_shardings(state, self.shardings)
        else:
            self.state = jax.device_put(state, self.shardings)
        self.initial, self.frozen = self.split(self.state)
        self.trainable_shardings, _ = self.split(self.shardings)

    def inputs(self, model: nnx.Module, images: jax.Array, rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """FrozenFeatures' head inputs, traced with the activations pinned to the batch axes as in pretraining
        (parallel/activations.py): otherwise GSPMD may follow the FSDP-split weights and all-reduce activations
        (measured on v5p-8: 239 GiB of all-reduce per full fine-tuning step), and TPUs get the splash kernel."""
        with activations.activation_sharding(self.mesh, self.rules):
            return super().inputs(model, images, rng)

    def split(self, state: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parts of a whole backbone state."""
        return state.split(self.filter, ...)

    def combine(self, trainable: nnx.State) -> nnx.State:
        """The whole backbone state with these trainable leaves."""
        return nnx.merge_state(self.frozen, trainable)


def layer_scales(trainable: nnx.State, depth: int, decay: float) -> Any:
    """A tree like `trainable` of each leaf's lr multiplier: decay^(depth + 1 - layer), layer 0 the embeddings
    (patch embedding, tokens, position embedding), i + 1 block i, depth + 1 the final norm."""

    def scale(path: tuple, _: Any) -> float:
        keys = [adapt_lib._key(p) for p in path]
        if str(keys[0]) == "blocks":
            layer = int(keys[1]) + 1
        elif str(keys[0]) == "norm":
            layer = depth + 1
        else:
            layer = 0
        return float(decay ** (depth + 1 - layer))

    return jax.tree_util.tree_map_with_path(scale, trainable)


class TunedBank(HeadBank):
    """One head trained jointly with the trainable part of an AdaptedFeatures backbone.

    The state adds "backbone" (the trainable leaves) and "backbone_opt" (their AdamW moments) to HeadBank's;
    `train_step(state, backbone, ...)` takes the frozen leaves from `backbone`, the environment's whole state.
    """

    def __init__(self, cfg: ClassifierConfig, opt: Optimization, features: AdaptedFeatures, mesh: Mesh):
        if len(opt.lrs) != 1:
            raise ValueError(f"a fine-tuned backbone trains one head lr, got {len(opt.lrs)}")
        super().__init__(cfg, opt, features, mesh)
        self.adapt = features.adapt
        self.backbone_tx = optax.chain(
            optax.scale_by_adam(opt.b1, opt.b2, opt.eps), optax.add_decayed_weights(opt.weight_decay)
        )
        self.scales = layer_scales(features.initial, features.cfg.depth, self.adapt.layer_decay)
        self.shardings = self.state_shardings(self.abstract_state())
        self._init = jax.jit(self._init_fn, out_shardings=self.shardings)
        self._restart = jax.jit(self._restart_fn, out_shardings=self.shardings)
        self.train_step = jax.jit(self._train_step, donate_argnums=0, out_shardings=(self.shardings, self.replicated))

    def init(self, seed: int, total_steps: int) -> dict:
        """A random head and the backbone as given (adapters as add_lora made them), fresh optimiser state."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        return self._init(jax.random.key(seed), jnp.int32(total_steps), self.features.initial)

    def _init_fn(self, key: jax.Array, total_steps: jax.Array, backbone: nnx.State | None = None) -> dict:
        state = super()._init_fn(key, total_steps)
        backbone = self.features.initial if backbone is None else backbone
        return {**state, "backbone": backbone, "backbone_opt": self.backbone_tx.init(backbone)}

    def _restart_fn(self, state: dict, total_steps: jax.Array) -> dict:
        fresh = self._fresh(state["params"], state["rest"], total_steps)
        return {**fresh, "backbone": state["backbone"], "backbone_opt": self.backbone_tx.init(state["backbone"])}

    def restart(self, state: dict, total_steps: int) -> dict:
        """The trained head and backbone of `state` with a fresh optimiser and schedule (the warm-started refit)."""
        return self._restart(state, jnp.int32(total_steps))

    def abstract_state(self) -> dict:
        return jax.eval_shape(self._init_fn, jax.random.key(0), jnp.int32(1), self.features.initial)

    def state_shardings(self, abstract: dict) -> dict:
        out = super().state_shardings({k: v for k, v in abstract.items() if not k.startswith("backbone")})
        trainable = self.features.trainable_shardings
        out["backbone"] = trainable
        out["backbone_opt"] = optax.tree_map_params(
            self.backbone_tx,
            lambda _, s: s,
            abstract["backbone_opt"],
            trainable,
            transform_non_params=lambda _: self.replicated,
            is_leaf=_is_var,
        )
        return out

    def backbone_state(self, state: dict) -> nnx.State:
        """The whole backbone state of a bank state (for prediction)."""
        return self.features.combine(state["backbone"])

    def _train_step(self, state: dict, backbone: nnx.State, batch: dict, rng: jax.Array) -> tuple[dict, jax.Array]:
        features: AdaptedFeatures = self.features
        _, frozen = features.split(backbone)
        images, labels = batch["image"], batch["labels"]
        k_backbone, k_heads = jax.random.split(jax.random.fold_in(rng, state["step"]))
        head_keys = jax.random.split(k_heads, self.size)

        def loss_fn(params, trainable):
            feats = features.inputs(nnx.merge(features.graphdef, trainable, frozen), images, rng=k_backbone)

            def one(p, r, k):
                return head_loss(nnx.merge(self.graphdef, p, r)(feats, dropout_rng=k), labels, self.opt.asymmetric_loss)

            losses = jax.vmap(one)(params, state["rest"], head_keys)
            return losses.sum(), losses  # the official heads share the backbone: its gradient is their sum

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, losses), grads = grad_fn(state["params"], state["backbone"])
        grads, bgrads = jax.tree.map(lambda g: jnp.where(jnp.isnan(g), 0.0, g), grads)
        updates, opt_state = jax.vmap(self.tx.update)(grads, state["opt"], state["params"])
        factor = cosine_factor(state["step"], state["total_steps"])
        lr = jnp.asarray(self.lrs) * factor
        params = jax.tree.map(lambda p, u: p - lr.reshape((-1,) + (1,) * (p.ndim - 1)) * u, state["params"], updates)
        bupdates, bopt = self.backbone_tx.update(bgrads, state["backbone_opt"], state["backbone"])
        trainable = jax.tree.map(
            lambda p, u, s: p - (self.adapt.lr * s) * factor * u, state["backbone"], bupdates, self.scales
        )
        new = {
            **state,
            "params": params,
            "opt": opt_state,
            "backbone": trainable,
            "backbone_opt": bopt,
            "step": state["step"] + 1,
        }
        return new, losses
