"""Where activations live: a trace-time context of (mesh, rules) that model code constrains against.

GSPMD propagates shardings from the inputs and parameters, and where the two disagree it may pick
the parameter's: an FSDP-sharded prototype matrix then turns the head's (rows, prototypes) logits
into a replicated-rows, sharded-prototypes array whose rows grow with the global batch. Constraining
activations by logical axis names (`batch` rows split over the data axes, features whole) keeps
per-chip memory set by the per-chip batch. The train step enters the context while it is traced;
outside it every function here is the identity, so models run unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from chexfound_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    mesh: Mesh
    rules: sharding.Rules

    @property
    def platform(self) -> str:
        """The platform the step is compiled for ("tpu" also for a deviceless topology)."""
        return self.mesh.devices.flat[0].platform

    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes of size > 1 that the `batch` rule splits rows over."""
        axes = dict(self.rules).get("batch") or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return tuple(a for a in axes if self.mesh.shape.get(a, 1) > 1)


_CONTEXT: contextvars.ContextVar[ActivationSharding | None] = contextvars.ContextVar(
    "activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: sharding.Rules) -> Iterator[ActivationSharding]:
    """Model code traced inside constrains its activations on `mesh` by `rules`."""
    ctx = ActivationSharding(mesh, tuple(rules))
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def current() -> ActivationSharding | None:
    return _CONTEXT.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x pinned to the sharding its logical axis names imply; identity outside a context."""
    ctx = current()
    if ctx is None:
        return x
    spec = sharding.logical_to_spec(tuple(logical), ctx.rules, ctx.mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Rows (leading axis) split over the batch axes, every other axis whole."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))
