"""Console progress of any job: rate over a moving window, ETA, one line per log point.

Example (per log interval; the first tick, after the run's first step, is the baseline, so the
compilation never enters a window):

    progress = Progress(total_steps, start_step, images_per_step=batch_size)
    line = progress.tick(step)            # 'step 120/250000 (0.05%) | 3.41 steps/s, 272.8 img/s | ETA 20h 21m'
    progress.interval_step_time_s        # the last window's seconds per step (throughput, MFU)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """'1d 4h 5m', '20h 21m', '5m 3s', '42s' (whole units, truncated): ETA precision, not timing."""
    s = int(max(seconds, 0))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


def format_progress(step: int, total_steps: int, steps_per_s: float | None, images_per_step: int | None = None) -> str:
    """'step 120/250000 (0.05%) | 3.41 steps/s, 272.8 img/s | ETA 20h 21m'; no rate yet: 'rate pending'."""
    line = f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.2f}%)"
    if not steps_per_s:
        return line + " | rate pending"
    rate = f"{steps_per_s:.3g} steps/s"
    if images_per_step:
        rate += f", {steps_per_s * images_per_step:.1f} img/s"
    return f"{line} | {rate} | ETA {format_duration(max(total_steps - step, 0) / steps_per_s)}"


class Progress:
    """Training rate over a moving window of (step, time) points, and console lines from it.

    start_step is the step the run (re)started from. Call tick(step) when `step` has finished (its
    metrics fetched: with async dispatch, earlier is only dispatch time), every step or only at log
    points. The first tick is the baseline, so the time before it (compilation, first batch) never
    enters the rate: the training loop ticks once right after the run's first step (the one that
    compiles), then at every log point, so the first log window already excludes the compilation.

    steps_per_s / step_time_s average over the last `window` tick intervals (console ETA);
    interval_step_time_s is the last interval alone (the logged throughput and MFU).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        images_per_step: int | None = None,
        window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps = total_steps
        self.start_step = start_step
        self.images_per_step = images_per_step
        self._clock = clock
        self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)

    def tick(self, step: int) -> str:
        """Record that `step` has finished; return its progress line."""
        self._points.append((step, self._clock()))
        return format_progress(step, self.total_steps, self.steps_per_s, self.images_per_step)

    @property
    def steps_per_s(self) -> float | None:
        """Steps per second over the window; None before two ticks (or no time elapsed)."""
        if len(self._points) < 2:
            return None
        (s0, t0), (s1, t1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    @property
    def interval_step_time_s(self) -> float | None:
        """Seconds per step between the last two ticks; None before two ticks (or no step between them)."""
        if len(self._points) < 2:
            return None
        (s0, t0), (s1, t1) = self._points[-2], self._points[-1]
        return (t1 - t0) / (s1 - s0) if t1 > t0 and s1 > s0 else None

    @property
    def steps_done(self) -> int:
        """Steps finished in this run (since start_step), as of the last tick."""
        return self._points[-1][0] - self.start_step if self._points else 0

    @property
    def step_time_s(self) -> float | None:
        rate = self.steps_per_s
        return 1 / rate if rate else None
