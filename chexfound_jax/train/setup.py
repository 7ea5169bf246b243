"""Everything a pretraining config implies on a mesh, assembled once and allocated lazily.

The benchmark, the tests and the pretraining job all need the same pieces (model config,
schedules, optimiser, mesh, shardings of state and batch, the compiled step); building them here
keeps one path from config to step. Nothing is allocated until `init_state` is called.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from chexfound_jax.data import batch_layout
from chexfound_jax.models import ModelConfig, abstract_params
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.parallel import sharding
from chexfound_jax.ssl.schedules import Schedules
from chexfound_jax.train import optimizer as optimizer_lib
from chexfound_jax.train import recipe
from chexfound_jax.train import state as state_lib
from chexfound_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Training:
    cfg: Any
    model_cfg: ModelConfig
    schedules: Schedules
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    batch_spec: dict[str, jax.ShapeDtypeStruct]
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    step: Any  # the jitted train step

    def init_state(self) -> state_lib.TrainState:
        """The step-0 state, created inside jit straight into its sharded layout."""
        init = lambda: state_lib.init_state(self.model_cfg, self.optimizer, self.cfg.train.seed)
        return jax.jit(init, out_shardings=self.state_shardings)()


def batch_shards(rules: sharding.Rules, mesh: jax.sharding.Mesh) -> int:
    """Devices the batch's group axis is split over (the `batch` rule's axes in this mesh)."""
    axes = dict(rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def build_training(
    cfg: Any,
    mesh_axes: Mapping[str, int] | None = None,
    rules: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> Training:
    """All pieces for `cfg`; mesh axes and rules default to the config's `parallel` section."""
    model_cfg = recipe.model_config(cfg)
    schedules = Schedules.from_config(recipe.schedule_config(cfg))
    optimizer = optimizer_lib.make_optimizer(abstract_params(model_cfg), schedules, cfg.optim)
    mesh = mesh_lib.create_mesh(mesh_axes if mesh_axes is not None else dict(cfg.parallel.mesh), devices)
    rules = sharding.resolve_rules(rules if rules is not None else cfg.parallel.rules)
    spec = batch_layout.batch_spec(cfg, batch_layout.batch_groups(cfg, batch_shards(rules, mesh)))
    batch_shardings = sharding.tree_shardings(batch_layout.batch_logical_axes(spec), spec, rules, mesh)
    abstract_state = jax.eval_shape(lambda: state_lib.init_state(model_cfg, optimizer, cfg.train.seed))
    state_shardings = state_lib.state_shardings(abstract_state, model_cfg, optimizer, rules, mesh)
    step = step_lib.compile_train_step(
        step_lib.make_train_step(cfg, model_cfg, optimizer, schedules), state_shardings, batch_shardings, mesh, rules
    )
    return Training(
        cfg=cfg,
        model_cfg=model_cfg,
        schedules=schedules,
        optimizer=optimizer,
        mesh=mesh,
        rules=rules,
        batch_spec=spec,
        batch_shardings=batch_shardings,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        step=step,
    )
