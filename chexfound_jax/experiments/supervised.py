"""The supervised baseline of the miniature experiment: the same ViT trained from scratch on the pool's labels.

A linear head on the class token, binary cross-entropy, AdamW with a warm-up and cosine decay, the official
classification augmentation (random resized crop 0.75-1 and horizontal flip), stochastic depth as in
pretraining. Its backbone then goes through the same probe as every other arm, so the comparison is
about the features, not the head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from chexfound_jax.data import classification
from chexfound_jax.models.vit import VisionTransformer, ViTConfig


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    seed: int = 0


def train(
    vit_cfg: ViTConfig, records: classification.LabelledRecords, image_size: int, cfg: SupervisedConfig
) -> tuple[dict, list[float]]:
    """(backbone parameters as a pure dict, the training loss of every step) for a one-class task."""
    if records.num_classes != 1:
        raise ValueError(f"the supervised baseline trains one binary label, got {records.num_classes} classes")
    model = VisionTransformer(vit_cfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, backbone = nnx.split(model)
    params = {"backbone": backbone, "head": {"w": jnp.zeros((vit_cfg.embed_dim, 1)), "b": jnp.zeros((1,))}}
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, int(cfg.warmup_fraction * cfg.steps), cfg.steps)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)

    def loss_fn(p: dict, images: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
        vit = nnx.merge(graphdef, p["backbone"])
        cls = vit.forward_features(images.astype(vit_cfg.compute_dtype), rng=key)["x_norm_clstoken"]
        logits = (cls.astype(jnp.float32) @ p["head"]["w"] + p["head"]["b"])[:, 0]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    @jax.jit
    def step(p, state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, labels, key)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    batches = classification.train_batches(
        records, classification.TrainTransform(image_size=image_size), batch_size=cfg.batch_size, seed=cfg.seed
    )
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.steps)
    losses = []
    for i in range(cfg.steps):
        batch = batches[i]
        params, opt_state, loss = step(params, opt_state, batch["image"], batch["labels"][:, 0], keys[i])
        losses.append(float(loss))
        if (i + 1) % 50 == 0 or i + 1 == cfg.steps:
            logging.info("supervised step %d/%d | loss %.4f", i + 1, cfg.steps, losses[-1])
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params["backbone"])), losses
