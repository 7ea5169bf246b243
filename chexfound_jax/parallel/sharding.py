"""Logical axis names -> mesh PartitionSpecs, through a rule table taken from the config.

Model code names each parameter dimension (embed, mlp, qkv, heads, prototypes, ...) and data
dimensions (batch). A rule maps a logical name to mesh axes; data parallel, FSDP and mixes are
different tables, not different code. Three conventions keep every table valid on every mesh:
mesh axes of size 1 or absent from the mesh are dropped; a mesh axis already used by an earlier
dimension of the same array is not reused; a dimension that the mesh axes do not divide evenly
is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | Sequence[str] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Replicated parameters, batch split over every mesh axis that carries data.
DATA_PARALLEL_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", None),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("norm", None),
    ("head_mlp", None),
    ("bottleneck", None),
    ("prototypes", None),
)

# ZeRO-3 style: every large parameter (and so its optimiser state) is split over fsdp;
# `tensor`, when the mesh has it, splits the FFN and attention widths (Megatron style).
FSDP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("norm", None),
    ("head_mlp", "fsdp"),
    ("bottleneck", None),
    ("prototypes", "fsdp"),
)

RULE_SETS = {"data_parallel": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry these logical names."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule (rules name {sorted(table)})")
        axes = [a for a in _as_tuple(table.get(name)) if mesh.shape.get(a, 1) > 1 and a not in used]
        if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = []
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def tree_shardings(logical_tree: Any, abstract_tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for a tree of PartitionSpecs of logical names and a matching shape tree."""
    return jax.tree.map(
        lambda logical, x: NamedSharding(mesh, logical_to_spec(tuple(logical), rules, mesh, x.shape)),
        logical_tree,
        abstract_tree,
    )


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """The tree's shapes and dtypes as jax.ShapeDtypeStructs carrying `shardings` (a tree of the same structure):
    what lowering or a sharded restore needs, nothing allocated."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def resolve_rules(rules: str | Rules | Mapping[str, MeshAxes]) -> Rules:
    """A rule table from its name ("fsdp", "data_parallel"), a mapping, or a list of pairs."""
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"unknown sharding rules {rules!r}; choose from {sorted(RULE_SETS)} or give a table")
        return RULE_SETS[rules]
    if isinstance(rules, Mapping):
        return tuple(rules.items())
    return tuple((name, axes) for name, axes in rules)
