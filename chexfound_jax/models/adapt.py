"""Which backbone parameters a downstream run trains: frozen | full | lora | bitfit.

The official evaluation (eval/classification/linear_glori.py) offers the frozen backbone of the GLoRI recipe,
`--fine-tune` (every backbone weight, backbone lr 1e-5), LoRA through Hugging Face peft (models/lora.py) and
BitFit. Each mode here is a predicate on a parameter's path inside the backbone, given as

- an nnx filter, `trainable_filter(mode, ...)`, for nnx.split / nnx.state / nnx.Optimizer(wrt=...);
- a tree of booleans, `trainable_mask(mode, params, ...)`, over a pure parameter dict or nnx.State, and
  `only_trainable(tx, mask)`, the optimiser that updates those and leaves the rest exactly as they are
  (optax.masked alone passes the other leaves' gradients through as their updates).

BitFit trains the bias terms: every parameter named `bias`, the LayerNorm biases included, as the BitFit
paper does (Ben Zaken et al. 2022: only the additive terms b, LayerNorm's among them, train; their code's
"all" selects every parameter whose name contains "bias"). In this backbone that is the patch embedding's
bias, qkv / proj / FFN biases and norm1 / norm2 / final norm biases; LayerScale gammas, norm scales and the
cls / register / position tokens stay frozen. `full` trains every parameter but `mask_token`, which no
downstream forward reads: PyTorch's optimisers skip a parameter without a gradient, while an AdamW step
here would still decay it, changing the exported weights for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from chexfound_jax.models.lora import LORA_LEAVES, LoRAConfig, module_name

MODES = ("frozen", "full", "lora", "bitfit")
_UNUSED_DOWNSTREAM = (("mask_token",),)  # paths no downstream forward reads


def check_mode(mode: str, lora: LoRAConfig | None = None) -> None:
    if mode not in MODES:
        raise ValueError(f"adaptation mode {mode!r} is not one of {MODES}")
    if mode == "lora" and lora is None:
        raise ValueError("adaptation mode 'lora' needs the LoRAConfig the backbone was adapted with")


def is_trainable(mode: str, path: Sequence[Any], lora: LoRAConfig | None = None) -> bool:
    """Whether the backbone parameter at `path` (keys below the backbone, e.g. ("blocks", 0, "attn", "qkv",
    "bias")) trains in `mode`. For lora: the adapters, and the biases `lora.bias` names."""
    check_mode(mode, lora)
    keys = tuple(str(k) for k in path)
    leaf = keys[-1]
    if mode == "frozen":
        return False
    if mode == "full":
        return keys not in _UNUSED_DOWNSTREAM
    if mode == "bitfit":
        return leaf == "bias"
    if leaf in LORA_LEAVES:
        return True
    if leaf != "bias" or lora.bias == "none":
        return False
    return lora.bias == "all" or lora.targets(module_name(path[:-1]))


def _key(entry: Any) -> Any:
    """A key of a path: nnx filters see plain keys, jax.tree_util paths DictKey / SequenceKey / GetAttrKey."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def trainable_filter(
    mode: str, lora: LoRAConfig | None = None, *, under: Sequence[Any] = ()
) -> Callable[[tuple, Any], bool]:
    """An nnx filter selecting the trainable backbone parameters of `mode`.

    `under`: the backbone's path in the module the filter is applied to (e.g. ("backbone",) in a model with
    heads); nothing outside it is selected, so combine with the head's own filter (nnx.Any).
    In lora mode the adapters are selected by their variable type, nnx.LoRAParam.
    """
    check_mode(mode, lora)
    under = tuple(under)

    def select(path: tuple, variable: Any) -> bool:
        if not isinstance(variable, nnx.Param) or tuple(path[: len(under)]) != under:
            return False
        rest = tuple(path[len(under) :])
        if mode == "lora" and rest and str(rest[-1]) in LORA_LEAVES:
            return isinstance(variable, nnx.LoRAParam)
        return bool(rest) and is_trainable(mode, rest, lora)

    return select


def trainable_mask(mode: str, params: Any, lora: LoRAConfig | None = None) -> Any:
    """A tree like `params` (a backbone's pure dict or nnx.State) with True where the parameter trains; for
    an nnx.State the booleans stand in place of the Variables (a prefix tree, as optax.masked takes)."""
    check_mode(mode, lora)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_trainable(mode, [_key(p) for p in path], lora),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def only_trainable(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`tx` on the leaves `mask` marks, zero updates elsewhere; optimiser state only for the marked leaves."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_trainable(mode: str, params: Mapping, lora: LoRAConfig | None = None) -> int:
    """Number of scalars that train in `mode` (the figure peft's print_trainable_parameters gives)."""
    mask = trainable_mask(mode, params, lora)
    return sum(int(x.size) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
