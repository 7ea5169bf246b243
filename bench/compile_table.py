"""The docs table of compile_check reports: one Markdown row per JSON file given.

  python -m bench.compile_table fit_v5p8.json fit_v5p128.json ... > table.md

A file may hold one report or a --max_batch search ({"reports": [...]}, one row per compiled batch).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import app

from chexfound_jax import cli

GIB = 1024**3
HEADER = (
    "| slice (chips) | rules, mesh | images/chip | remat | peak GiB/chip (temp) | HBM GiB | fits | recompute |"
    " all-gather + all-reduce GiB/step | roofline ms (bound) | compile s |\n|" + "---|" * 11
)


def row(r: dict[str, Any]) -> str:
    head = f"| {r['topology']} ({r['num_devices']}) | {r['rules']}, {r['mesh']} | {r['per_device_batch']} |"
    head += f" {r['model']['remat']} |"
    hbm = f"{r['hbm_bytes'] / GIB:.0f}" if r.get("hbm_bytes") else "?"
    if "memory" not in r:
        return head + f" — | {hbm} | no ({r.get('error', '')[:60]}) | | | | |"
    m, f = r["memory"], r["flops_per_device"]
    c = r["collectives_per_device"]
    gathered = (c["all-gather"]["bytes"] + c["all-reduce"]["bytes"]) / GIB
    roof = r.get("roofline", {})
    bound = f"{roof['step_s_lower_bound'] * 1e3:.0f} ({roof['bound_by']})" if roof else ""
    return (
        head + f" {m['peak'] / GIB:.2f} ({m['temp'] / GIB:.2f}) | {hbm} | {'yes' if r['fits'] else 'no'} |"
        f" {100 * f['recompute_overhead']:.1f}% | {gathered:.2f} | {bound} | {r['compile_s']:.0f} |"
    )


def main(argv: list[str]) -> None:
    """Positional arguments only (absl's app, as every program here): the report files."""
    if len(argv) < 2:
        raise app.UsageError("give one or more compile_check JSON files")
    print(HEADER)
    for path in argv[1:]:
        data = json.loads(pathlib.Path(path).read_text())
        for report in data.get("reports", [data]):
            print(row(report))


if __name__ == "__main__":
    cli.run(main)
