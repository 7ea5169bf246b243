"""Per-iteration training schedules (official train/train.py `build_schedulers`), as functions of the step.

The official code precomputes numpy arrays (DINOv2 `CosineScheduler`) and indexes them with the
iteration. Here each schedule is a closed-form function of the step so it can live inside a jitted
train step and be driven by the optimiser's own counter (which resumes with the checkpoint):

  [0] * freeze_iters ++ linspace(start_warmup, base, warmup_iters) ++ cosine(base -> final)

and `final` for any step >= total_iters. Pass `xp=np` for a float64 numpy twin of the official
arrays (used to check against the golden values at rtol 1e-12); the default `xp=jnp` is float32.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[Any], Any]

REFERENCE_BATCH = 1024  # `scaling_rule: sqrt_wrt_1024`


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The sqrt scaling rule: base_lr is quoted for batch 1024 (80 -> 5.59e-5 from 2e-4)."""
    return base_lr * math.sqrt(global_batch / REFERENCE_BATCH)


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    freeze_iters: int = 0,
    *,
    xp: types.ModuleType = jnp,
) -> Schedule:
    """DINOv2's CosineScheduler as a function of the step (int scalar or array).

    The cosine part final + 0.5 * (base - final) * (1 + cos(pi * i / n)) is evaluated through the
    exact identities 0.5 * (1 + cos x) = sin^2((pi - x) / 2) = 1 - sin^2(x / 2), choosing the form
    without cancellation, so float32 stays within a few ulps where the official form loses digits.
    """
    if min(total_iters, warmup_iters, freeze_iters) < 0 or warmup_iters + freeze_iters > total_iters:
        raise ValueError(f"bad schedule lengths: total {total_iters}, warmup {warmup_iters}, freeze {freeze_iters}")
    dtype = xp.float64 if xp is np else jnp.float32
    n_cos = total_iters - warmup_iters - freeze_iters
    warmup_step = (base - start_warmup) / (warmup_iters - 1) if warmup_iters > 1 else 0.0
    warmup_end = base if warmup_iters > 1 else start_warmup  # linspace's last point is exactly stop

    def schedule(step):
        step = xp.asarray(step)
        t = step.astype(dtype)
        i_warm = t - freeze_iters
        warm = xp.where(i_warm == warmup_iters - 1, warmup_end, start_warmup + i_warm * warmup_step)
        i_cos = t - (freeze_iters + warmup_iters)
        if final <= base:  # decaying: both terms of final + (base - final) * sin^2 share a sign
            sin = xp.sin(np.pi * (n_cos - i_cos) / (2 * max(n_cos, 1)))
            cos = final + (base - final) * sin * sin
        else:  # rising (wd, momentum): the same identity anchored at base
            sin = xp.sin(np.pi * i_cos / (2 * max(n_cos, 1)))
            cos = base + (final - base) * sin * sin
        value = xp.where(step < freeze_iters + warmup_iters, warm, cos)
        value = xp.where(step < freeze_iters, 0.0, value)
        return xp.where(step >= total_iters, final, value).astype(dtype)

    return _compiled(schedule, xp)


def masked_schedule(schedule: Schedule, zero_until: int, *, xp: types.ModuleType = jnp) -> Schedule:
    """`schedule` with its first `zero_until` steps set to 0 (the official last-layer freeze)."""

    def masked(step):
        value = schedule(step)
        return xp.where(xp.asarray(step) < zero_until, xp.zeros_like(value), value)

    return _compiled(masked, xp)


def _compiled(schedule: Schedule, xp: types.ModuleType) -> Schedule:
    """jit the jnp variant: a dozen eager ops cost seconds, and inside a jitted step it inlines."""
    return jax.jit(schedule) if xp is jnp else schedule


def _get(cfg: Any, name: str, *aliases: str) -> Any:
    for key in (name, *aliases):
        if key in cfg:
            return cfg[key]
    raise KeyError(f"schedule config needs {name!r}")


def _global_batch(cfg: Any) -> int:
    if "global_batch_size" in cfg:
        return int(cfg["global_batch_size"])
    return int(_get(cfg, "batch_size_per_gpu")) * int(_get(cfg, "world_size"))


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The five schedules of one training stage (all restart from step 0 at every stage)."""

    lr: Schedule
    last_layer_lr: Schedule
    wd: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    total_iters: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, *, xp: types.ModuleType = jnp) -> Schedules:
        """Builds the official schedules from a flat dict / ConfigDict of hyper-parameters.

        Also accepts the official names OFFICIAL_EPOCH_LENGTH and batch_size_per_gpu x world_size.
        """
        epoch = int(_get(cfg, "epoch_length", "OFFICIAL_EPOCH_LENGTH"))
        total = int(_get(cfg, "epochs")) * epoch
        peak = scaled_lr(float(_get(cfg, "base_lr")), _global_batch(cfg))
        lr = cosine_schedule(peak, _get(cfg, "min_lr"), total, int(_get(cfg, "warmup_epochs")) * epoch, xp=xp)
        temp_iters = int(_get(cfg, "warmup_teacher_temp_epochs")) * epoch
        teacher_temp = _get(cfg, "teacher_temp")
        return cls(
            lr=lr,
            last_layer_lr=masked_schedule(lr, int(_get(cfg, "freeze_last_layer_epochs")) * epoch, xp=xp),
            wd=cosine_schedule(_get(cfg, "weight_decay"), _get(cfg, "weight_decay_end"), total, xp=xp),
            momentum=cosine_schedule(_get(cfg, "momentum_teacher"), _get(cfg, "final_momentum_teacher"), total, xp=xp),
            teacher_temp=cosine_schedule(
                teacher_temp, teacher_temp, temp_iters, temp_iters, _get(cfg, "warmup_teacher_temp"), xp=xp
            ),
            total_iters=total,
        )

    def __call__(self, step) -> dict[str, Any]:
        """All five values at `step`, e.g. for logging."""
        names = ("lr", "last_layer_lr", "wd", "momentum", "teacher_temp")
        return {name: getattr(self, name)(step) for name in names}
