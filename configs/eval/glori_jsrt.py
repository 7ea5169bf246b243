"""GLoRI (--cat-cls) on the `jsrt` task of chexfound_jax.eval.tasks (classes, label policy and splits there)."""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task.name = "jsrt"
    return c
