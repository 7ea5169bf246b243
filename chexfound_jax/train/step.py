"""The CheXFound / DINOv2 training step as one pure function: (state, batch) -> (state, metrics).

Teacher (no drop path) on the 2 global crops -> DINO targets from its class tokens (crops swapped)
and iBOT targets from its patch tokens at the masked positions, both Sinkhorn-Knopp (or centred
softmax); student (drop path, masks on the global crops) on all crops -> DINO, KoLeo and iBOT
losses; AdamW on the student; then the teacher follows by EMA. All sums run over the global batch,
so under jit on a mesh they are the official all-reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from chexfound_jax.models import DINOHead, ModelConfig, VisionTransformer
from chexfound_jax.parallel import activations
from chexfound_jax.parallel.sharding import Rules
from chexfound_jax.ssl import chunked, losses
from chexfound_jax.ssl.schedules import Schedules
from chexfound_jax.train.state import TrainState

Batch = dict[str, jax.Array]


class _Graphs:
    """Flax graph definitions, so pure parameter dicts can be bound to modules inside the step."""

    def __init__(self, model_cfg: ModelConfig):
        self.backbone = nnx.graphdef(nnx.eval_shape(lambda: VisionTransformer(model_cfg.backbone, rngs=nnx.Rngs(0))))
        self.heads = {
            name: nnx.graphdef(nnx.eval_shape(lambda h=head: DINOHead(h, rngs=nnx.Rngs(0))))
            for name, head in model_cfg.heads().items()
        }

    def vit(self, params: dict) -> VisionTransformer:
        return nnx.merge(self.backbone, nnx.State(params))

    def head(self, name: str, params: dict) -> DINOHead:
        return nnx.merge(self.heads[name], nnx.State(params))


def _gather_masked(patches: jax.Array, groups: int, indices: jax.Array) -> jax.Array:
    """Patch tokens (G*2b, N, D) at per-group flat indices (G, M) -> (G*M, D), gathered within groups."""
    d = patches.shape[-1]
    flat = patches.reshape(groups, -1, d)
    return jnp.take_along_axis(flat, indices[..., None], axis=1).reshape(-1, d)


def _crops_first(x: jax.Array, groups: int, crops: int) -> jax.Array:
    """(G*crops*b, ...) in per-group crop-major order -> (crops, G*b, ...)."""
    x = x.reshape(groups, crops, -1, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0).reshape(crops, -1, *x.shape[3:])


def _bottleneck_by_group(head: DINOHead, patches: jax.Array, groups: int) -> jax.Array:
    """(groups, tokens, bottleneck) head features of masked patch tokens, rows kept on their chips."""
    z = head.bottleneck(patches).reshape(groups, -1, head.last_layer.v.shape[0])
    return activations.constrain_batch(z)


def _entropy(p: jax.Array) -> jax.Array:
    return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1)


class TrainStep:
    """The pure step for a config, `(state, batch) -> (state, metrics)`; compile it with `compile_train_step`.

    A class only to name the step's parts (teacher targets, iBOT term, student loss); it holds no state
    beyond the config, so calling it is a pure function of its arguments.
    """

    def __init__(self, cfg: Any, model_cfg: ModelConfig, optimizer: optax.GradientTransformation, schedules: Schedules):
        if cfg.train.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"train.centering must be sinkhorn_knopp or centering, got {cfg.train.centering!r}")
        self.cfg, self.optimizer, self.schedules = cfg, optimizer, schedules
        self.graphs = _Graphs(model_cfg)
        self.ibot_head = "ibot_head" if model_cfg.ibot_head is not None else "dino_head"
        self.n_local = cfg.crops.local_crops_number
        self.sinkhorn = cfg.train.centering == "sinkhorn_knopp"
        # iBOT logits of the masked tokens in row chunks of this size (never whole: at 64 images per chip
        # one (tokens, 131072) float32 array is 11 GB); 0 computes them whole.
        self.ibot_chunk = int(cfg.ibot.get("loss_chunk_size", 0))

    def teacher_targets(self, teacher: dict, batch: Batch, temp: jax.Array, centers: dict):
        """DINO targets, and iBOT targets (whole) or the teacher's iBOT features (chunked)."""
        groups, two_b = batch["global_crops"].shape[:2]
        out = self.graphs.vit(teacher["backbone"]).forward_features(
            batch["global_crops"].reshape(-1, *batch["global_crops"].shape[2:])
        )
        cls = out["x_norm_clstoken"].reshape(groups, 2, two_b // 2, -1)[:, ::-1]  # swap crops: [t2; t1]
        dino_logits = self.graphs.head("dino_head", teacher["dino_head"])(cls.reshape(-1, cls.shape[-1]))
        dino_logits = activations.constrain_batch(dino_logits)
        patches = _gather_masked(out["x_norm_patchtokens"], groups, batch["mask_indices"])
        head = self.graphs.head(self.ibot_head, teacher[self.ibot_head])
        valid = batch["mask_valid"].reshape(-1)
        if self.ibot_chunk:
            ibot_target = {"z": _bottleneck_by_group(head, patches, groups), "w": head.last_layer.weight()}
        else:
            ibot_logits = activations.constrain_batch(head(patches))
        if self.sinkhorn:
            dino_q = losses.sinkhorn_knopp(dino_logits, temp)
            if not self.ibot_chunk:
                ibot_target = losses.sinkhorn_knopp(ibot_logits, temp, valid=valid)
        else:
            dino_q = losses.softmax_center_teacher(dino_logits, centers["dino"], temp)
            m = self.cfg.train.center_momentum
            centers = {**centers, "dino": losses.update_center(centers["dino"], dino_logits, m)}
            if not self.ibot_chunk:  # chunked: the loss pass updates the iBOT centre
                ibot_target = losses.softmax_center_teacher(ibot_logits, centers["ibot"], temp) * valid[:, None]
                centers["ibot"] = losses.update_center(centers["ibot"], ibot_logits, m, valid=valid)
        stats = {
            # Collapse monitors: a collapsed teacher gives every image the same distribution.
            "teacher_entropy": jnp.mean(_entropy(jax.nn.softmax(dino_logits / temp))),
            "teacher_batch_entropy": _entropy(jnp.mean(jax.nn.softmax(dino_logits / temp), axis=0)),
        }
        dino_q = dino_q.reshape(groups, 2, two_b // 2, -1)
        dino_q = jnp.moveaxis(dino_q, 1, 0).reshape(2, -1, dino_q.shape[-1])
        return jax.lax.stop_gradient(dino_q), jax.lax.stop_gradient(ibot_target), centers, stats

    def ibot_term(self, student: dict, batch: Batch, patches: jax.Array, ibot_target, temp, center):
        """(iBOT loss, new iBOT centre or None) of the student's masked patch tokens."""
        groups, two_b = batch["global_crops"].shape[:2]
        head = self.graphs.head(self.ibot_head, student[self.ibot_head])
        weights = batch["mask_weights"]
        if not self.ibot_chunk:
            logits = activations.constrain_batch(head(patches))
            return losses.ibot_loss(logits, ibot_target, weights.reshape(-1), n_global_images=groups * two_b), None
        return chunked.ibot_loss_chunked(
            _bottleneck_by_group(head, patches, groups),
            head.last_layer.weight(),
            ibot_target["z"],
            ibot_target["w"],
            temp,
            batch["mask_valid"],
            weights,
            groups * two_b,
            centering=self.cfg.train.centering,
            center=None if self.sinkhorn else center,
            center_momentum=self.cfg.train.center_momentum,
            chunk_size=self.ibot_chunk,
        )

    def student_loss(self, student: dict, batch: Batch, dino_q, ibot_target, temp, ibot_center, key: jax.Array):
        groups, two_b = batch["global_crops"].shape[:2]
        b = two_b // 2
        k_global, k_local = jax.random.split(key)
        vit = self.graphs.vit(student["backbone"])
        dino = self.graphs.head("dino_head", student["dino_head"])
        x_global = batch["global_crops"].reshape(-1, *batch["global_crops"].shape[2:])
        x_local = batch["local_crops"].reshape(-1, *batch["local_crops"].shape[2:])
        out_g = vit.forward_features(x_global, batch["masks"].reshape(groups * two_b, -1), rng=k_global, groups=groups)
        out_l = vit.forward_features(x_local, rng=k_local, groups=groups)
        cls_g = out_g["x_norm_clstoken"]
        dino_logits = lambda cls: activations.constrain_batch(dino(cls))
        terms = losses.dino_loss(
            _crops_first(dino_logits(out_l["x_norm_clstoken"]), groups, self.n_local),
            _crops_first(dino_logits(cls_g), groups, 2),
            dino_q,
        )
        cls_by_crop = cls_g.reshape(groups, 2, b, -1)
        terms["koleo_loss"] = sum(
            losses.koleo_loss(cls_by_crop[:, c].reshape(groups * b, -1), group_size=b) for c in range(2)
        )
        patches = _gather_masked(out_g["x_norm_patchtokens"], groups, batch["mask_indices"])
        terms["ibot_loss"], new_center = self.ibot_term(student, batch, patches, ibot_target, temp, ibot_center)
        total = (
            self.cfg.dino.loss_weight * (terms["dino_local_crops_loss"] + terms["dino_global_crops_loss"])
            + self.cfg.dino.koleo_loss_weight * terms["koleo_loss"]
            + self.cfg.ibot.loss_weight * terms["ibot_loss"]
        )
        return total, (terms, new_center)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        temp = self.schedules.teacher_temp(state.step)
        momentum = self.schedules.momentum(state.step)
        rng, key = jax.random.split(state.rng)
        dino_q, ibot_target, centers, stats = self.teacher_targets(state.teacher, batch, temp, state.centers)
        (total, (terms, ibot_center)), grads = jax.value_and_grad(self.student_loss, has_aux=True)(
            state.student, batch, dino_q, ibot_target, temp, centers["ibot"], key
        )
        if ibot_center is not None:
            centers = {**centers, "ibot": ibot_center}
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        teacher = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, state.teacher, student)
        metrics = {
            "total_loss": total,
            **terms,
            **stats,
            "lr": self.schedules.lr(state.step),
            "wd": self.schedules.wd(state.step),
            "momentum": momentum,
            "teacher_temp": temp,
            "grad_norm": optax.global_norm(grads),
            **{f"grad_norm/{name}": optax.global_norm(g) for name, g in grads.items()},
            "param_norm": optax.global_norm(student),
            "update_norm": optax.global_norm(updates),
        }
        new_state = TrainState(
            step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state, rng=rng, centers=centers
        )
        return new_state, metrics


def make_train_step(
    cfg: Any, model_cfg: ModelConfig, optimizer: optax.GradientTransformation, schedules: Schedules
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step for a config; compile it with `compile_train_step`."""
    return TrainStep(cfg, model_cfg, optimizer, schedules)


def compile_train_step(
    step_fn: Callable,
    state_shardings: TrainState,
    batch_shardings: dict,
    mesh: jax.sharding.Mesh,
    rules: Rules = (),
) -> Callable:
    """jit with explicit shardings; the state is donated (updated in place), metrics replicated.

    The step is traced inside the activation-sharding context of (mesh, rules), so activations stay
    split over the batch axes (parallel.activations) instead of following FSDP-sharded weights.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharded_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with activations.activation_sharding(mesh, rules):
            return step_fn(state, batch)

    return jax.jit(
        sharded_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
