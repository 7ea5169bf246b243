"""Classification heads on a frozen backbone: a bank of heads, one per learning rate, trained at once.

The official protocol (eval/classification/linear_glori.py) trains one head per learning rate on the same
frozen features; here the heads are stacked on a leading axis and updated with `jax.vmap`, so the backbone
runs once per batch for the whole grid. Each head has its own random init (and, for GLoRI, its own frozen
queries), AdamW with decoupled weight decay on every trainable parameter, and cosine decay to 0 without
warmup (torch's CosineAnnealingLR, stepped every iteration). NaN gradients are zeroed before the update.

Batches are sharded over every mesh axis (data parallel); backbone and heads are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chexfound_jax.eval.losses import head_loss
from chexfound_jax.models.build import model_from_params
from chexfound_jax.models.classifiers import ClassifierConfig, build_classifier, head_inputs
from chexfound_jax.models.vit import ViTConfig


@dataclasses.dataclass(frozen=True)
class Optimization:
    """Head training settings (official linear_glori.py defaults). The schedule length is an argument of the step,
    so one compiled step serves runs of any length (phases, label-efficiency subsets)."""

    lrs: tuple[float, ...]
    weight_decay: float = 1e-4
    asymmetric_loss: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if not self.lrs:
            raise ValueError("train.lrs is empty: give at least one learning rate")


def cosine_factor(step: jax.Array, total_steps: jax.Array | int) -> jax.Array:
    """CosineAnnealingLR(T_max=total_steps, eta_min=0) as a multiplier of the base lr at `step`."""
    t = jnp.minimum(step, total_steps).astype(jnp.float32)
    return 0.5 * (1.0 + jnp.cos(jnp.pi * t / jnp.asarray(total_steps, jnp.float32)))


def _transform(opt: Optimization) -> optax.GradientTransformation:
    # AdamW without the lr: the per-head lr is applied in the step, so one vmapped transform serves the bank.
    return optax.chain(optax.scale_by_adam(opt.b1, opt.b2, opt.eps), optax.add_decayed_weights(opt.weight_decay))


class FrozenFeatures:
    """A backbone held as (graphdef, state) and the head inputs it computes, without gradients."""

    def __init__(self, vit_cfg: ViTConfig, params: dict, n_blocks: int, dtype: str = "float32"):
        if not 1 <= n_blocks <= vit_cfg.depth:
            raise ValueError(f"n_last_blocks={n_blocks} must be in [1, {vit_cfg.depth}]")
        self.cfg = vit_cfg.replace(dtype=dtype, drop_path_rate=0.0)
        self.n_blocks = n_blocks
        self.graphdef, self.state = nnx.split(model_from_params(self.cfg, params))

    def __call__(self, state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
        """Head inputs of (B, H, W, C) images, or of (B, V, H, W, C) views: the views' "cls" and "avgpool"
        concatenated in view order, "patch" of the first view (GLoRI reads one image)."""
        return jax.tree.map(jax.lax.stop_gradient, self.inputs(nnx.merge(self.graphdef, state), images))

    def inputs(self, model: nnx.Module, images: jax.Array, rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """The head inputs `model` computes (a training forward with `rng`: adapter dropout, drop path)."""
        views = images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images
        feats = head_inputs(model.last_blocks(views.astype(self.cfg.compute_dtype), self.n_blocks, norm=True, rng=rng))
        if images.ndim == 5:
            b, v = images.shape[:2]
            feats = {
                "cls": feats["cls"].reshape(b, -1),
                "avgpool": feats["avgpool"].reshape(b, -1),
                "patch": feats["patch"].reshape(b, v, *feats["patch"].shape[1:])[:, 0],
            }
        return feats


class HeadBank:
    """H heads of one architecture, stacked, with their optimizer state; pure functions over a state dict.

    The state is {"params", "rest", "opt", "step", "total_steps"}: trainable parameters, non-trained
    variables (GLoRI's frozen queries), AdamW moments, the number of updates done, and the length of the
    cosine schedule.
    """

    def __init__(self, cfg: ClassifierConfig, opt: Optimization, features: FrozenFeatures, mesh: Mesh):
        self.cfg, self.opt, self.features, self.mesh = cfg, opt, features, mesh
        abstract = nnx.eval_shape(lambda: build_classifier(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.lrs = np.asarray(opt.lrs, np.float32)
        self.tx = _transform(opt)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._init = jax.jit(self._init_fn, out_shardings=self.replicated)
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict, static_argnames="flip")

    @property
    def size(self) -> int:
        return len(self.lrs)

    def init(self, seed: int, total_steps: int) -> dict:
        """Independent random heads (different seeds per head, as the official per-lr heads)."""
        _check_steps(total_steps)
        return self._init(jax.random.key(seed), jnp.int32(total_steps))

    def _init_fn(self, key: jax.Array, total_steps: jax.Array) -> dict:
        def one(k):
            _, params, rest = nnx.split(build_classifier(self.cfg, rngs=nnx.Rngs(k)), nnx.Param, ...)
            return params, rest

        params, rest = jax.vmap(one)(jax.random.split(key, self.size))
        return self._fresh(params, rest, total_steps)

    def _fresh(self, params: nnx.State, rest: nnx.State, total_steps: Any) -> dict:
        opt = jax.vmap(self.tx.init)(params)
        return {"params": params, "rest": rest, "opt": opt, "step": jnp.int32(0), "total_steps": jnp.int32(total_steps)}

    def from_heads(self, params: nnx.State, rest: nnx.State, total_steps: int) -> dict:
        """A bank state starting from given stacked heads (fresh optimizer): the official warm-started refit."""
        _check_steps(total_steps)
        return jax.device_put(self._fresh(params, rest, total_steps), self.replicated)

    def abstract_state(self) -> dict:
        """The state's structure, shapes and dtypes (for restoring a checkpoint)."""
        return jax.eval_shape(self._init_fn, jax.random.key(0), jnp.int32(1))

    def state_shardings(self, abstract: dict) -> dict:
        """Where each leaf of a bank state lives (restoring a checkpoint): heads are replicated."""
        return jax.tree.map(lambda _: self.replicated, abstract)

    def head(self, state: dict, i: int) -> tuple[nnx.State, nnx.State]:
        """Head i's (params, rest), unstacked."""
        take = lambda x: x[i]
        return jax.tree.map(take, state["params"]), jax.tree.map(take, state["rest"])

    def module(self, params: nnx.State, rest: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest)

    def _train_step(self, state: dict, backbone: nnx.State, batch: dict, rng: jax.Array) -> tuple[dict, jax.Array]:
        feats = self.features(backbone, batch["image"])
        labels = batch["labels"]

        def loss_fn(params, rest, key):
            logits = nnx.merge(self.graphdef, params, rest)(feats, dropout_rng=key)
            return head_loss(logits, labels, self.opt.asymmetric_loss)

        keys = jax.random.split(jax.random.fold_in(rng, state["step"]), self.size)
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn))(state["params"], state["rest"], keys)
        grads = jax.tree.map(lambda g: jnp.where(jnp.isnan(g), 0.0, g), grads)
        updates, opt_state = jax.vmap(self.tx.update)(grads, state["opt"], state["params"])
        lr = jnp.asarray(self.lrs) * cosine_factor(state["step"], state["total_steps"])
        params = jax.tree.map(lambda p, u: p - lr.reshape((-1,) + (1,) * (p.ndim - 1)) * u, state["params"], updates)
        new = {**state, "params": params, "opt": opt_state, "step": state["step"] + 1}
        return new, losses

    def _predict(
        self, params: nnx.State, rest: nnx.State, backbone: nnx.State, images: jax.Array, flip: str = "none"
    ) -> jax.Array:
        """Sigmoid probabilities (H, B, K) of every head, in eval mode, with the `flip` test-time mode."""

        def probs(x):
            feats = self.features(backbone, x)
            logits = jax.vmap(lambda p, r: nnx.merge(self.graphdef, p, r)(feats))(params, rest)
            return jax.nn.sigmoid(logits.astype(jnp.float32))

        check_flip(flip)
        mirrored = images[..., ::-1, :]  # (..., H, W, C): HFlip; after Normalize it equals flipping before
        if flip == "only":
            return probs(mirrored)
        if flip == "average":
            return 0.5 * (probs(images) + probs(mirrored))
        return probs(images)

    @functools.partial(jax.jit, static_argnums=0)
    def attention(self, params: nnx.State, rest: nnx.State, backbone: nnx.State, images: jax.Array):
        """(probabilities (B, K), per-head cross-attention (B, heads, K, N)) of one GLoRI head."""
        feats = self.features(backbone, images)
        logits, attn = nnx.merge(self.graphdef, params, rest)(feats, return_attention=True)
        return jax.nn.sigmoid(logits.astype(jnp.float32)), attn


FLIP_MODES = ("none", "only", "average")


def check_flip(flip: str) -> None:
    """eval.flip: "none"; "only" evaluates mirrored images (the official --flip of linear_glori.py); "average"
    averages the probabilities of each image and its mirror (test-time augmentation)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"eval.flip must be one of {FLIP_MODES}, got {flip!r}")


def _check_steps(total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")


def select_best(scores: Sequence[float]) -> int:
    """Index of the highest validation score; NaN never wins, ties go to the smaller lr index."""
    arr = np.asarray(scores, np.float64)
    if np.all(np.isnan(arr)):
        raise ValueError("every head's validation metric is undefined (NaN): check the validation labels")
    return int(np.nanargmax(arr))


def stack_heads(heads: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    """[(params, rest), ...] -> stacked (params, rest) with a leading head axis."""
    params = jax.tree.map(lambda *x: jnp.stack(x), *[h[0] for h in heads])
    rest = jax.tree.map(lambda *x: jnp.stack(x), *[h[1] for h in heads])
    return params, rest
