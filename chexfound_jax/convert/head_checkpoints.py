"""Classification heads <-> the official CheXFound classifier checkpoints (official eval/classification/glori.py).

The official linear / GLoRI evaluation saves `{"model": {"classifiers_dict.<name>.<key>": tensor},
"iteration": ...}` (plus optimizer / scheduler entries), one `<name>` per trained head, e.g.
`linear:blocks=4:avgpool=False:lr=0_0001000000` (GLoRI heads carry the same "linear:" names).
Inside a head, GLoRI keys are `decoder.*` and linear-probe keys `linear.weight` / `linear.bias`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from chexfound_jax.convert.layouts import ConversionError
from chexfound_jax.models.classifiers import ClassifierConfig, abstract_classifier_state

PREFIX = "classifiers_dict."
_NAME = re.compile(r"^(?P<kind>\w+):blocks=(?P<n>\d+):avgpool=(?P<avgpool>True|False):lr=(?P<lr>\d+_\d+)$")

Rule = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x):
    return x


def _t(x):
    return x.T


def _layer(name: str, jax_path: tuple[str, ...], is_norm: bool = False) -> list[Rule]:
    weight = ("scale",) if is_norm else ("kernel",)
    move = _same if is_norm else _t
    return [(f"{name}.weight", jax_path + weight, move, move), (f"{name}.bias", (*jax_path, "bias"), _same, _same)]


# torch key, JAX path, to torch, from torch; in the official state_dict order (module registration order)
_L = "decoder.layers.0."
GLORI_RULES: list[Rule] = [
    ("decoder.duplicate_pooling", ("duplicate_pooling",), lambda x: x[..., None], lambda x: x[..., 0]),
    ("decoder.duplicate_pooling_bias", ("duplicate_pooling_bias",), _same, _same),
    *_layer(_L + "norm1", ("norm1",), is_norm=True),
    (_L + "multihead_attn.in_proj_weight", ("multihead_attn", "in_proj", "kernel"), _t, _t),
    (_L + "multihead_attn.in_proj_bias", ("multihead_attn", "in_proj", "bias"), _same, _same),
    *_layer(_L + "multihead_attn.out_proj", ("multihead_attn", "out_proj")),
    *_layer(_L + "linear1", ("linear1",)),
    *_layer(_L + "linear2", ("linear2",)),
    *_layer(_L + "norm2", ("norm2",), is_norm=True),
    *_layer(_L + "norm3", ("norm3",), is_norm=True),
    *_layer("decoder.embed_standart", ("embed_standart",)),
    ("decoder.query_embed.weight", ("query_embed",), _same, _same),
]
LINEAR_RULES: list[Rule] = _layer("linear", ("linear",))


def head_name(lr: float, n_blocks: int = 4, avgpool: bool = False) -> str:
    """The official classifiers_dict name: lr to 10 decimals, dots replaced by underscores."""
    return f"linear:blocks={n_blocks}:avgpool={avgpool}:lr={lr:.10f}".replace(".", "_")


def parse_head_name(name: str) -> dict[str, Any]:
    """{"n_blocks", "avgpool", "lr"} of an official head name."""
    m = _NAME.match(name)
    if not m:
        raise ConversionError(f"head name {name!r} is not like 'linear:blocks=4:avgpool=False:lr=0_0010000000'")
    return {"n_blocks": int(m["n"]), "avgpool": m["avgpool"] == "True", "lr": float(m["lr"].replace("_", "."))}


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _rules(cfg: ClassifierConfig) -> list[Rule]:
    return GLORI_RULES if cfg.kind == "glori" else LINEAR_RULES


def export_classifier(cfg: ClassifierConfig, state: Mapping) -> dict[str, np.ndarray]:
    """Head variables -> the official head state dict (keys without the classifiers_dict.<name>. prefix)."""
    abstract = abstract_classifier_state(cfg)
    out = {}
    for key, path, to_torch, _ in _rules(cfg):
        try:
            value = np.asarray(_get(state, path))
        except (KeyError, TypeError) as e:
            raise ConversionError(f"classifier state has no variable {'/'.join(path)!r}") from e
        want = tuple(_get(abstract, path).shape)
        if value.shape != want:
            raise ConversionError(f"classifier variable {'/'.join(path)!r} has shape {value.shape}, expected {want}")
        out[key] = np.ascontiguousarray(to_torch(value))
    return out


def _bare_decoder(sd: Mapping[str, Any]) -> bool:
    return "embed_standart.weight" in sd and not any(k.startswith("decoder.") for k in sd)


def _infer_config(
    sd: Mapping[str, Any], n_blocks: int, avgpool: bool, num_heads: int, views: int, describe: Callable[[str], str]
) -> ClassifierConfig:
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ConversionError(f"missing key {describe(key)}")
        value = sd[key]
        if not hasattr(value, "shape"):
            raise ConversionError(f"key {describe(key)} is a {type(value).__name__}, not a tensor")
        return tuple(value.shape)

    def dims(key: str, n: int) -> tuple[int, ...]:
        s = shape(key)
        if len(s) != n:
            raise ConversionError(f"key {describe(key)} has shape {s}, expected {n} dims")
        return s

    def per_block(width: int, parts: int, key: str) -> int:
        if width % parts:
            raise ConversionError(f"key {describe(key)}: input width {width} is not a multiple of {parts}")
        return width // parts

    if any(k.startswith("decoder.") for k in sd):
        d, f = dims("decoder.embed_standart.weight", 2)
        k, _ = dims("decoder.query_embed.weight", 2)
        ffn, _ = dims(_L + "linear1.weight", 2)
        _, pooled, _ = dims("decoder.duplicate_pooling", 3)
        if pooled not in (d, d + f):
            raise ConversionError(
                f"key {describe('decoder.duplicate_pooling')} has width {pooled}: neither the decoder width {d} "
                f"nor decoder + features {d + f} (cat_cls)"
            )
        if d % num_heads:
            raise ConversionError(
                f"decoder width {d} ({describe('decoder.embed_standart.weight')}) is not divisible by num_heads "
                f"{num_heads}; pass num_heads"
            )
        return ClassifierConfig(
            kind="glori",
            num_classes=k,
            embed_dim=per_block(f, n_blocks, "decoder.embed_standart.weight"),
            n_blocks=n_blocks,
            avgpool=avgpool,
            decoder_dim=d,
            num_heads=num_heads,
            ffn_dim=ffn,
            cat_cls=pooled == d + f,
        )
    if "linear.weight" in sd:
        k, width = dims("linear.weight", 2)
        embed = per_block(width, views * (n_blocks + int(avgpool)), "linear.weight")
        return ClassifierConfig(
            kind="linear", num_classes=k, embed_dim=embed, n_blocks=n_blocks, avgpool=avgpool, views=views
        )
    raise ConversionError(f"no GLoRI (decoder.*) or linear-probe (linear.weight) keys, got {sorted(sd)[:5]}")


def import_classifier(
    sd: Mapping[str, Any],
    *,
    n_blocks: int = 4,
    avgpool: bool = False,
    num_heads: int = 8,
    views: int = 1,
    where: str = "",
) -> tuple[ClassifierConfig, dict]:
    """Official head state dict -> (config, variables as a pure dict of numpy); strict on keys and shapes.

    The architecture comes from the tensor shapes; n_blocks and avgpool from the head name (see
    parse_head_name); num_heads (official: 8) and a linear head's views (2 for --multiview) cannot be
    seen in shapes. `where` is prepended to key
    names in error messages (e.g. "classifiers_dict.<name>."). A bare decoder dict (the
    nn.TransformerDecoder's own keys, without "decoder.") is accepted too.
    """
    bare = _bare_decoder(sd)
    if bare:
        sd = {f"decoder.{k}": v for k, v in sd.items()}

    def describe(key: str) -> str:
        return repr(where + (key.removeprefix("decoder.") if bare else key))

    cfg = _infer_config(sd, n_blocks, avgpool, num_heads, views, describe)
    abstract = abstract_classifier_state(cfg)
    rules = _rules(cfg)
    known = {key for key, *_ in rules}
    for key in sd:
        if key not in known:
            raise ConversionError(f"unknown key {describe(key)} for a {cfg.kind} head")
    state: dict = {}
    for key, path, to_torch, from_torch in rules:
        if key not in sd:
            raise ConversionError(f"missing key {describe(key)}")
        value = sd[key]
        if not hasattr(value, "shape"):
            raise ConversionError(f"key {describe(key)} is a {type(value).__name__}, not a tensor")
        value = np.asarray(value)
        want = tuple(to_torch(np.empty(_get(abstract, path).shape, np.bool_)).shape)
        if value.shape != want:
            raise ConversionError(f"key {describe(key)} has shape {value.shape}, expected {want}")
        _set(state, path, from_torch(value).astype(np.float32))
    return cfg, state


def _model_dict(obj: Mapping) -> Mapping:
    model = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
    return {k.removeprefix("module."): v for k, v in model.items()}


def is_head_checkpoint(obj: Mapping) -> bool:
    """Whether a checkpoint holds classifier heads (classifiers_dict.* keys or a bare head dict)."""
    sd = _model_dict(obj)
    return any(k.startswith((PREFIX, "decoder.")) for k in sd) or set(sd) == {"linear.weight", "linear.bias"}


def read_head_file(obj: Mapping, name: str | None = None) -> tuple[str, dict]:
    """(name, head state dict without prefix) of one head in a checkpoint's top-level object.

    A file with several heads (the phase-1 file holds one per lr) needs `name`. A bare head state
    dict (no classifiers_dict) comes back with the name "".
    """
    sd = _model_dict(obj)
    heads: dict[str, dict] = {}
    for key, value in sd.items():
        if key.startswith(PREFIX):
            head, _, rest = key[len(PREFIX) :].partition(".")
            heads.setdefault(head, {})[rest] = value
    if not heads:
        if name:
            raise ConversionError(f"no classifiers_dict.* keys: cannot pick head {name!r}")
        return "", dict(sd)
    others = [k for k in sd if not k.startswith(PREFIX)]
    if others:
        raise ConversionError(f"unknown key {others[0]!r} beside the classifiers_dict.* heads")
    if name is None:
        if len(heads) > 1:
            raise ConversionError(f"the file holds {len(heads)} heads; pick one by name: {sorted(heads)}")
        name = next(iter(heads))
    if name not in heads:
        raise ConversionError(f"no head named {name!r}; the file holds {sorted(heads)}")
    return name, heads[name]


def head_file(name: str, sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The official checkpoint object of one head: {"model": {classifiers_dict.<name>.<key>: ...}, "iteration": 0}."""
    return {"model": {f"{PREFIX}{name}.{k}": v for k, v in sd.items()}, "iteration": 0}


def write_head_file(path: str | epath.Path, name: str, sd: Mapping[str, np.ndarray]) -> None:
    """head_file(name, sd) as a .pth (torch.save), or its flat "model" dict as .safetensors."""
    from chexfound_jax.convert import torch_io

    path = epath.Path(path)
    obj = head_file(name, sd)
    if path.suffix == ".safetensors":
        torch_io.write_checkpoint(obj["model"], path)
        return
    import torch

    obj["model"] = {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in obj["model"].items()}
    with path.open("wb") as f:
        torch.save(obj, f)
