"""bench/train_step.py: the compile-only memory path on the tiny config (chexfound_jax.compile_check's
compile_abstract and memory_figures), and its throughput lines. parse_mesh is tested in test_topology.py."""

import jax
import pytest

from bench import train_step
from chexfound_jax import compile_check
from chexfound_jax.models.flops import vit_block_flops
from chexfound_jax.parallel import hlo_stats
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.train import flops, recipe
from chexfound_jax.train.setup import build_training
from configs.pretrain import tiny_cpu

# LLVM at -O0: half the CPU compile time, the same buffer assignment.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _memory(remat: str) -> tuple[dict[str, int], float, object]:
    """(memory figures, compiled matmul FLOPs, config) of the step with the given remat policy."""
    cfg = tiny_cpu.get_config()
    cfg.model.remat = remat
    cfg.train.update(global_batch_size=8, batch_groups=1)
    training = build_training(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])
    compiled, seconds = train_step.compile_abstract(training, FAST_COMPILE)
    assert seconds > 0
    return train_step.memory_figures(compiled), hlo_stats.analyse(compiled.as_text(), 1).matmul_flops, cfg


def test_memory_only_figures_and_full_remat_recomputes_the_student_blocks():
    (plain, plain_flops, cfg), (remat, remat_flops, _) = _memory(remat="none"), _memory(remat="full")
    for figures in (plain, remat):
        for key in ("argument", "output", "temp", "alias", "peak"):
            assert figures[key] > 0, (key, figures)
        # The state is donated: the new state reuses its buffers (alias > 0), at most the output's size.
        assert figures["alias"] <= min(figures["argument"], figures["output"]), figures
        assert figures["peak"] == figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    # Whether remat lowers the temp is the compiler's scheduling (XLA:CPU often keeps as many buffers live:
    # docs/benchmarks.md). What full remat guarantees is the recomputation: the compiled step runs the
    # forward matmuls of every student block once more (the teacher, embeddings and heads are not
    # rematerialised), the rows batch-subset drop path keeps included.
    vit = recipe.model_config(cfg).backbone
    b, n_local = cfg.train.global_batch_size, cfg.crops.local_crops_number
    kept = {rows: flops.kept_rows(vit, rows) / rows for rows in (2 * b, n_local * b)}
    student_blocks = vit.depth * (
        2 * vit_block_flops(vit, cfg.crops.global_crops_size) * kept[2 * b]
        + n_local * vit_block_flops(vit, cfg.crops.local_crops_size) * kept[n_local * b]
    )
    assert remat_flops - plain_flops == pytest.approx(b * student_blocks, rel=1e-6), (remat_flops, plain_flops)


def test_uses_the_shared_compile_and_mesh_helpers():
    assert train_step.compile_abstract is compile_check.compile_abstract
    assert train_step.memory_figures is compile_check.memory_figures
    assert not hasattr(train_step, "parse_mesh") and not hasattr(train_step, "_with_shardings")
    assert train_step.mesh_lib.parse_mesh is mesh_lib.parse_mesh


def test_throughput_lines_show_executed_and_nominal():
    # 100 img/s on 2 devices of 1e14 FLOP/s: executed 1e12 FLOP/image -> 50 TFLOP/s, MFU 50%;
    # nominal 1.5e12 -> 75 TFLOP/s, 75%.
    flops = {"executed_total": 1e12, "total": 1.5e12}
    text = train_step.throughput_lines(flops, 100.0, 2, 1e14)
    assert text.splitlines() == [
        "TFLOP/s per device: executed 50, nominal 75",
        "MFU: executed 50.0%, nominal 75.0% of 100 TFLOP/s",
    ]
    assert "MFU" not in train_step.throughput_lines(flops, 100.0, 2, None)
