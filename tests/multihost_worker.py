"""One of two processes (4 CPU devices each) running the train step on one 8-device mesh.

Launched by tests/test_train_step.py; process 0 writes the metrics of each step as JSON.
Usage: python multihost_worker.py PROCESS_ID PORT OUT_JSON MESH RULES
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"  # as conftest
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import numpy as np


def main(process_id: int, port: int, out: str, mesh_axes: str, rules: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from helpers import equivalence_config, random_batches, setup_train  # after jax.distributed

    cfg = equivalence_config()
    axes = {k: int(v) for k, v in (kv.split("=") for kv in mesh_axes.split(","))}
    state, step, spec, batch_shardings = setup_train(cfg, axes, rules)
    metrics = []
    for batch in random_batches(cfg, spec, 2):  # every process draws the same global batch ...
        # ... and hands jax only the groups its own devices hold.
        arrays = {
            k: jax.make_array_from_callback(v.shape, batch_shardings[k], lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }
        state, m = step(state, arrays)
        metrics.append({k: float(np.asarray(jax.device_get(v))) for k, v in m.items()})
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(metrics, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
