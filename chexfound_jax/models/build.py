"""Model instances from a config and a pure parameter dict (as load_weights returns them)."""

from __future__ import annotations

import jax
from flax import nnx

from chexfound_jax.models.vit import VisionTransformer, ViTConfig


def model_from_params(cfg: ViTConfig, params: dict) -> VisionTransformer:
    """A VisionTransformer holding `params` on the default device.

    The module is built abstractly (no random init is computed) and the parameters are placed on
    the device once, so jitted calls do not copy host arrays on every step.
    """
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(jax.device_put(params))
    nnx.update(model, state)
    return model
