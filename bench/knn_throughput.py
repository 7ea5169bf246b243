"""Throughput of the weighted kNN of the knn workflow (chexfound_jax.eval.knn.knn_scores): queries/s.

Random L2-normalised training features (--train x --dim, float32) with --classes labels (10% unknown), and
--queries query features; every k of --ks scored at once (official: 10, 20, 100, 200), queries in chunks of
--chunk. `single` searches the training rows on one device; `sharded` shards them over every local device
(top k per device, then merged), as the workflow does on its mesh. One untimed call compiles; each timed
call (median of --iters) includes moving the training features to the devices, as the workflow pays once
per split.

    python -m bench.knn_throughput --train=200000 --dim=1024 --queries=4096 --out=knn.json

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from chexfound_jax import cli
from chexfound_jax.eval import knn
from chexfound_jax.parallel.mesh import create_mesh

MODES = ("single", "sharded")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_integer("train", 200_000, "Training (neighbour bank) rows.", lower_bound=1, **fv)
    flags.DEFINE_integer("dim", 1024, "Feature width (ViT-L class token: 1024).", lower_bound=1, **fv)
    flags.DEFINE_integer("queries", 4096, "Query rows per timed call.", lower_bound=1, **fv)
    flags.DEFINE_integer("classes", 40, "Label columns (CXR-LT: 40).", lower_bound=1, **fv)
    flags.DEFINE_list("ks", ["10", "20", "100", "200"], "Neighbour counts scored at once.", **fv)
    flags.DEFINE_integer("chunk", 1024, "Queries per similarity block (knn.query_chunk).", lower_bound=1, **fv)
    flags.DEFINE_list("modes", list(MODES), f"Which of {MODES}.", **fv)
    flags.DEFINE_integer("iters", 3, "Timed calls (median).", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "Data seed.", **fv)
    flags.DEFINE_string("out", None, "Also write the results to this JSON file.", **fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    unknown = sorted(set(f.modes) - set(MODES))
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; choose from {MODES}")
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}")
    rng = np.random.default_rng(f.seed)
    train = rng.standard_normal((f.train, f.dim), dtype=np.float32)
    labels = (rng.random((f.train, f.classes)) < 0.1).astype(np.float32)
    labels[rng.random(labels.shape) < 0.1] = np.nan
    queries = rng.standard_normal((f.queries, f.dim), dtype=np.float32)
    ks = tuple(int(k) for k in f.ks)
    print(f"train {f.train} x {f.dim}, {f.queries} queries in chunks of {f.chunk}, ks {ks}, {f.classes} classes")
    results: dict = {"device": device.device_kind, "devices": jax.device_count(), "jax": jax.__version__}
    results |= {"train": f.train, "dim": f.dim, "queries": f.queries, "chunk": f.chunk, "ks": list(ks), "modes": {}}
    for mode in f.modes:
        mesh = create_mesh({"data": -1}) if mode == "sharded" else None
        run = lambda: knn.knn_scores(train, labels, queries, ks, chunk=f.chunk, mesh=mesh)  # noqa: B023
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times = []
        for _ in range(f.iters):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        results["modes"][mode] = {"first_call_s": first, "seconds": step, "queries_per_s": f.queries / step}
        print(f"{mode}: {f.queries / step:.0f} queries/s ({step:.2f} s per call; first call {first:.2f} s)", flush=True)
    if f.out:
        pathlib.Path(f.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
