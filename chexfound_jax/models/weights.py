"""Model weights on disk: an orbax checkpoint of the parameter tree plus model_config.json.

This is what `python -m chexfound_jax.convert --to=jax` writes and what embedding and
evaluation read. Paths may be local or gs:// (etils.epath).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from chexfound_jax.models.model import ModelConfig, abstract_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _str_keys(tree: Any) -> Any:
    """orbax stores dict keys as strings; nnx.List children are ints."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _restore_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def save_weights(directory: str | epath.Path, cfg: ModelConfig, params: dict) -> epath.Path:
    """Writes params (shaped as abstract_params(cfg)) and the config; refuses to overwrite."""
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists")
    _check_tree(params, abstract_params(cfg), str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(cfg.to_json())
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((directory / PARAMS_DIR).resolve(), _str_keys(jax.tree.map(np.asarray, params)))
    return directory


def load_config(directory: str | epath.Path) -> ModelConfig:
    import json

    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a chexfound_jax weights directory")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_weights(directory: str | epath.Path, **backbone_overrides: Any) -> tuple[ModelConfig, dict]:
    """(config, params as numpy) from save_weights; runtime fields (dtype, remat...) overridable."""
    directory = epath.Path(directory)
    cfg = load_config(directory)
    if backbone_overrides:
        cfg = ModelConfig(cfg.backbone.replace(**backbone_overrides), cfg.dino_head, cfg.ibot_head)
    abstract = abstract_params(cfg)
    target = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), _str_keys(abstract))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore((directory / PARAMS_DIR).resolve(), target)
    return cfg, _restore_keys(jax.tree.map(np.asarray, restored), abstract)


def _check_tree(params: dict, abstract: dict, where: str) -> None:
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, spec in want:
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"{where}: parameter {name} is missing")
        if tuple(np.shape(got[path])) != tuple(spec.shape):
            raise ValueError(f"{where}: parameter {name} has shape {np.shape(got[path])}, expected {spec.shape}")
    if len(got) != len(want):
        extra = set(got) - {p for p, _ in want}
        raise ValueError(f"{where}: unexpected parameter {jax.tree_util.keystr(sorted(extra, key=str)[0])}")
