"""The pretraining state: one pytree, created directly in its sharded layout.

Student and teacher are pure parameter dicts ({"backbone", "dino_head"[, "ibot_head"]}); the
teacher starts as an exact copy of the student and then follows it by EMA. The centres are used
only by the softmax-centering alternative to Sinkhorn-Knopp.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chexfound_jax.models import DINOHead, ModelConfig, VisionTransformer
from chexfound_jax.models.model import logical_axes
from chexfound_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (), iterations done
    student: dict
    teacher: dict
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key, checkpoint-friendly
    centers: dict  # {"dino": (1, K), "ibot": (1, K)} float32


def init_params(model_cfg: ModelConfig, key: jax.Array) -> dict:
    """Freshly initialised student parameters (official init), as a pure dict."""
    keys = jax.random.split(key, 1 + len(model_cfg.heads()))
    params = {"backbone": _pure(VisionTransformer(model_cfg.backbone, rngs=nnx.Rngs(keys[0])))}
    for k, (name, head) in zip(keys[1:], model_cfg.heads().items()):
        params[name] = _pure(DINOHead(head, rngs=nnx.Rngs(k)))
    return params


def _pure(module: nnx.Module) -> dict:
    return nnx.state(module, nnx.Param).to_pure_dict()


def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """The step-0 state (pure; jit it with out_shardings to create it sharded)."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    student = init_params(model_cfg, init_key)
    prototypes = model_cfg.dino_head.out_dim
    ibot_prototypes = (model_cfg.ibot_head or model_cfg.dino_head).out_dim
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=student,
        teacher=jax.tree.map(jnp.copy, student),
        opt_state=optimizer.init(student),
        rng=rng,
        centers={"dino": jnp.zeros((1, prototypes)), "ibot": jnp.zeros((1, ibot_prototypes))},
    )


def state_shardings(
    abstract: TrainState, model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rules: Any, mesh: Mesh
) -> TrainState:
    """Where every leaf lives: parameters (and their optimiser moments) by the rule table, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = sharding.tree_shardings(logical_axes(model_cfg), abstract.student, rules, mesh)
    opt = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, params, transform_non_params=lambda _: replicated
    )
    return TrainState(
        step=replicated,
        student=params,
        teacher=params,
        opt_state=opt,
        rng=replicated,
        centers=jax.tree.map(lambda _: replicated, abstract.centers),
    )
