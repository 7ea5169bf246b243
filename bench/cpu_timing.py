"""Timed windows over an iterator with the CPU time of the whole process tree (/proc): the measurement of
bench.loader_throughput, shared with its torchvision side, which another interpreter runs, hence standard library
only."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, user + system CPU seconds)} of every process /proc shows."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return table


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """CPU seconds so far of `root` (default: this process) and each living descendant, by pid."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out[pid] = table[pid][1]
            todo.extend(children.get(pid, ()))
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree used between two `tree_cpu` snapshots (processes born in between count in full)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def measure(iterator: Any, *, batch: int, warmup: int, window_batches: int, windows: int) -> list[dict[str, float]]:
    """Consume `warmup` batches, then time `windows` consecutive windows of `window_batches` batches each."""
    for _ in range(warmup):
        next(iterator)
    out = []
    for _ in range(windows):
        cpu0, t0 = tree_cpu(), time.perf_counter()
        for _ in range(window_batches):
            next(iterator)
        t1, cpu1 = time.perf_counter(), tree_cpu()
        wall, cpu = t1 - t0, cpu_between(cpu0, cpu1)
        main_cpu = cpu1[os.getpid()] - cpu0[os.getpid()]
        images = window_batches * batch
        out.append(
            {"images": images, "wall_s": wall, "cpu_s": cpu, "main_cpu_s": main_cpu, "images_per_s": images / wall}
        )
        out[-1]["images_per_core_s"] = images / cpu if cpu > 0 else float("nan")
        out[-1]["cores"] = cpu / wall
    return out


def summarize(windows: list[dict[str, float]]) -> dict[str, Any]:
    """Median and best of the per-window figures."""
    out: dict[str, Any] = {"windows": windows}
    for key in ("images_per_s", "images_per_core_s", "cores"):
        values = [w[key] for w in windows]
        out[key] = statistics.median(values)
        if key != "cores":
            out[f"{key}_best"] = max(values)
    out["cpu_ms_per_image"] = 1e3 / out["images_per_core_s"]
    out["main_cpu_share"] = sum(w["main_cpu_s"] for w in windows) / max(sum(w["cpu_s"] for w in windows), 1e-9)
    return out


def plan(images: int, batch: int, workers: int) -> tuple[int, int]:
    """(warm-up batches, batches per window): windows hold whole rounds over the workers."""
    rounds = max(1, workers)
    window = -(-max(images, batch) // batch)
    window = -(-window // rounds) * rounds
    return max(1, 2 * workers), window
