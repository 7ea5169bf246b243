"""Classification heads on frozen backbone features: GLoRI and the linear probe, and their files.

A head is described by a `ClassifierConfig`; its variables are a pure nested dict (what
`nnx.state(module).to_pure_dict()` gives, GLoRI's frozen queries included). A classifier
directory holds `classifier_config.json` (config + free-form JSON metadata such as class names
and the learning rate) and `classifier.npz` (the variables, keys joined by "/"). Paths may be
local or gs:// (etils.epath).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from chexfound_jax.models import layers
from chexfound_jax.models.glori import FrozenQuery, GLoRI, feature

__all__ = [
    "ClassifierConfig",
    "FrozenQuery",
    "GLoRI",
    "LinearProbe",
    "abstract_classifier_state",
    "build_classifier",
    "classifier_from_state",
    "head_inputs",
    "is_classifier_dir",
    "load_classifier",
    "save_classifier",
]

KINDS = ("glori", "linear")
CONFIG_FILE = "classifier_config.json"
STATE_FILE = "classifier.npz"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A GLoRI or linear-probe head. Defaults are the official ones (eval/classification/glori.py, linear_glori.py)."""

    kind: str  # "glori" or "linear"
    num_classes: int
    embed_dim: int  # backbone width D
    n_blocks: int = 4  # last blocks used: CLS concat and GLoRI patch features are n_blocks * D wide
    avgpool: bool = False  # linear only: append the mean of the deepest block's patch tokens
    decoder_dim: int = 768  # GLoRI
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    cat_cls: bool = False  # GLoRI: [CLS concat ; query output] before the group FC
    norm_eps: float = 1e-5
    views: int = 1  # linear only: views per sample (2: --multiview), their inputs concatenated in order

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"classifier kind {self.kind!r} is not one of {KINDS}")
        for name in ("num_classes", "embed_dim", "n_blocks", "decoder_dim", "num_heads", "ffn_dim", "views"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"classifier field {name} must be a positive int, got {value!r}")
        if self.decoder_dim % self.num_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.views > 1 and self.kind != "linear":
            raise ValueError(f"views={self.views}: only the linear probe takes several views (GLoRI reads one image)")

    @property
    def feature_dim(self) -> int:
        """F: width of the CLS concat and of the concatenated patch features."""
        return self.n_blocks * self.embed_dim

    @property
    def view_features(self) -> int:
        """Linear-probe input width per view: CLS concat, plus D with avgpool."""
        return self.feature_dim + (self.embed_dim if self.avgpool else 0)

    @property
    def in_features(self) -> int:
        """Input width of the linear probe: every view's [CLS concat (; avgpool)], view after view."""
        return self.views * self.view_features

    @property
    def pooled_dim(self) -> int:
        """F': per-class input of GLoRI's group FC (decoder width, plus F with cat_cls)."""
        return self.decoder_dim + (self.feature_dim if self.cat_cls else 0)

    def replace(self, **changes: Any) -> ClassifierConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {sorted(unknown)}")
        missing = {"kind", "num_classes", "embed_dim"} - set(d)
        if missing:
            raise ValueError(f"ClassifierConfig fields missing: {sorted(missing)}")
        return cls(**d)


def head_inputs(blocks: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """VisionTransformer.last_blocks(x, n, norm=True) -> the float32 inputs of every head (get_intermediate_layers).

    blocks are (cls (B, D), registers (B, R, D), patches (B, N, D)), shallow to deep. Channel
    l * D + d of "cls" / "patch" belongs to the l-th block; "avgpool" is the mean of the deepest
    block's patch tokens. Unused entries cost nothing under jit. For V views per sample (`views_input`)
    "cls" and "avgpool" hold the views one after another, (B, V * width).
    """
    if not blocks:
        raise ValueError("head_inputs needs at least one block")
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    return {
        "cls": jnp.concatenate([f32(cls) for cls, _, _ in blocks], axis=-1),
        "patch": jnp.concatenate([f32(patch) for _, _, patch in blocks], axis=-1),
        "avgpool": f32(blocks[-1][2]).mean(axis=1),
    }


class LinearProbe(nnx.Module):
    """DINOv2's LinearClassifier: one Linear on the CLS concat (+ avgpool), weight N(0, 0.01), bias 0."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.linear = layers.Linear(
            cfg.in_features,
            cfg.num_classes,
            axes=("embed", None),
            kernel_init=nnx.initializers.normal(0.01),
            rngs=rngs,
        )
        self.feature_dim = cfg.feature_dim
        self.embed_dim = cfg.embed_dim
        self.avgpool = cfg.avgpool
        self.views = cfg.views

    def __call__(
        self, features: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None, return_attention: bool = False
    ) -> jax.Array:
        """Logits (B, K). The probe has no dropout, so dropout_rng is accepted and unused."""
        del dropout_rng
        if return_attention:
            raise ValueError("the linear probe has no attention maps (return_attention is GLoRI only)")
        v = self.views
        x = feature(features, "cls", v * self.feature_dim, ndim=2)
        if self.avgpool:  # per view [cls ; avgpool], as the official linear input of each view
            pooled = feature(features, "avgpool", v * self.embed_dim, ndim=2)
            per_view = [x.reshape(-1, v, self.feature_dim), pooled.reshape(-1, v, self.embed_dim)]
            x = jnp.concatenate(per_view, axis=-1).reshape(x.shape[0], -1)
        return self.linear(x)


def build_classifier(cfg: ClassifierConfig, *, rngs: nnx.Rngs) -> GLoRI | LinearProbe:
    """A freshly initialised head (official inits)."""
    return GLoRI(cfg, rngs=rngs) if cfg.kind == "glori" else LinearProbe(cfg, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ClassifierConfig) -> nnx.Module:
    return nnx.eval_shape(lambda: build_classifier(cfg, rngs=nnx.Rngs(0)))


def abstract_classifier_state(cfg: ClassifierConfig) -> dict:
    """Shapes/dtypes of every variable (trainable and frozen) as a pure dict, without allocating."""
    return nnx.state(_abstract(cfg)).to_pure_dict()


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _checked(cfg: ClassifierConfig, flat: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """flat (name -> array) checked against the config's variables, as float32 numpy."""
    want = _flatten(abstract_classifier_state(cfg))
    out = {}
    for name, spec in want.items():
        if name not in flat:
            raise ValueError(f"{where}: variable {name!r} is missing")
        value = np.asarray(flat[name])
        if value.shape != tuple(spec.shape):
            raise ValueError(f"{where}: variable {name!r} has shape {value.shape}, expected {tuple(spec.shape)}")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{where}: variable {name!r} has dtype {value.dtype}, expected floating point")
        out[name] = value.astype(spec.dtype)
    unknown = sorted(set(flat) - set(want))
    if unknown:
        raise ValueError(f"{where}: unexpected variable {unknown[0]!r} for a {cfg.kind} head")
    return out


def classifier_from_state(cfg: ClassifierConfig, state: Mapping) -> GLoRI | LinearProbe:
    """The head holding these variable values (built abstractly: no random init is computed)."""
    values = _unflatten(_checked(cfg, _flatten(state), "classifier state"))
    graphdef, abstract = nnx.split(_abstract(cfg))
    abstract.replace_by_pure_dict(jax.tree.map(jnp.asarray, values))
    return nnx.merge(graphdef, abstract)


def _json_metadata(metadata: Mapping[str, Any]) -> dict:
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata field {key!r} is not JSON-serialisable: {e}") from e
    return dict(metadata)


def save_classifier(
    directory: str | epath.Path, cfg: ClassifierConfig, state: Mapping, metadata: Mapping[str, Any] | None = None
) -> epath.Path:
    """Writes the head's variables and config (+ metadata) to a classifier dir; refuses to overwrite."""
    directory = epath.Path(directory)
    for name in (STATE_FILE, CONFIG_FILE):
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists")
    flat = _checked(cfg, _flatten(state), "classifier state")
    meta = _json_metadata(metadata or {})
    buf = io.BytesIO()
    np.savez(buf, **flat)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).write_bytes(buf.getvalue())
    # the config is written last: its presence marks a complete directory
    (directory / CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict(), "metadata": meta}, indent=2))
    return directory


def is_classifier_dir(path: str | epath.Path) -> bool:
    return (epath.Path(path) / CONFIG_FILE).exists()


def load_classifier(directory: str | epath.Path) -> tuple[ClassifierConfig, dict, dict]:
    """(config, variables as a pure dict of numpy, metadata) of a classifier dir."""
    directory = epath.Path(directory)
    config_path, state_path = directory / CONFIG_FILE, directory / STATE_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not a classifier directory")
    try:
        blob = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    if not isinstance(blob, dict) or "config" not in blob:
        raise ValueError(f"{config_path}: no 'config' entry")
    try:
        cfg = ClassifierConfig.from_dict(blob["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} not found")
    try:
        with np.load(io.BytesIO(state_path.read_bytes()), allow_pickle=False) as f:
            flat = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{state_path}: cannot be read as a .npz archive: {e}") from e
    state = _unflatten(_checked(cfg, flat, str(state_path)))
    return cfg, state, dict(blob.get("metadata") or {})
