"""Timing loops the benchmarks share: untimed warm-up calls, then each timed call waited on."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def time_calls(fn: Callable[..., Any], args: Sequence[Any], warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls fn(*args) after `warmup` untimed ones, each blocked until ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_steps(step: Callable, state: Any, batches: Sequence[Any], warmup: int, steps: int) -> tuple[Any, Any, list]:
    """(state, last metrics, seconds per timed step) of a donating train step cycling through `batches`,
    each step waited on through its metrics."""
    metrics = None
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return state, metrics, times
