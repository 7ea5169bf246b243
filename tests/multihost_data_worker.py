"""One of two processes (4 CPU devices each) reading training batches onto one 8-device mesh.

Launched by tests/test_data_pipeline.py. Each process writes what it read (record indices, global array
shapes and shardings) as JSON. Usage: python multihost_data_worker.py PROCESS_ID PORT DATASET OUT_JSON
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"  # as conftest
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import numpy as np
from absl import flags


def main(process_id: int, port: int, dataset: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    flags.FLAGS.mark_as_parsed()
    from chexfound_jax.data import pipeline
    from chexfound_jax.train.setup import build_training
    from configs.pretrain import tiny_cpu

    cfg = tiny_cpu.get_config()
    cfg.train.update(global_batch_size=16, batch_groups=8)
    cfg.data.update(datasets=(dataset,))
    training = build_training(cfg, {"data": 4, "fsdp": 2}, "fsdp")
    crops = training.batch_shardings["global_crops"]
    shard, shards = pipeline.process_data_shard(crops, 8)
    layout = pipeline.train_layout(cfg, num_batch_shards=8, process_count=shards)
    ds = pipeline.training_dataset(cfg, layout, process_index=shard)
    shardings = pipeline.data_shardings(next(iter(ds)), crops)
    it = pipeline.DeviceIterator(ds, shardings, layout.groups)
    finish = jax.jit(lambda x: pipeline.finish_on_device(x, cfg), out_shardings=training.batch_shardings)
    report = {"records": [], "checksums": []}
    report["data_shard"] = [shard, shards]
    for _ in range(3):  # 24 records, 16 per global batch: 8 per process and step
        batch, local = next(it)
        report["records"] += np.asarray(local["record_index"]).ravel().tolist()
        finished = finish(batch)  # exactly the train step's batch: shapes, dtypes and shardings
        assert all(finished[k].sharding == training.batch_shardings[k] for k in finished)
        report["checksums"].append(float(jax.jit(lambda x: x.astype("float32").sum())(finished["global_crops"])))
    report["shapes"] = {k: list(v.shape) for k, v in finished.items()}
    report["local_shapes"] = {k: list(v.shape) for k, v in local.items()}
    report["addressable"] = len(finished["global_crops"].addressable_shards)
    it.close()
    with open(out, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
