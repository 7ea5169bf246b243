"""bench/train_step.py: the compile-only memory path on the tiny config, and the --mesh parser."""

import jax
import pytest

from bench import train_step
from chexfound_jax.train.setup import build_training
from configs.pretrain import tiny_cpu

# LLVM at -O0: half the CPU compile time, the same buffer assignment.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _memory(remat: bool) -> dict[str, int]:
    cfg = tiny_cpu.get_config()
    cfg.model.remat = remat
    cfg.train.update(global_batch_size=8, batch_groups=1)
    training = build_training(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])
    figures, _ = train_step.compile_abstract(training, FAST_COMPILE)
    return figures


def test_memory_only_figures_are_positive_and_remat_does_not_add_temp():
    plain, remat = _memory(remat=False), _memory(remat=True)
    for figures in (plain, remat):
        for key in ("argument", "output", "temp", "alias", "peak"):
            assert figures[key] > 0, (key, figures)
        # The state is donated: the new state reuses its buffers (alias > 0), at most the output's size.
        assert figures["alias"] <= min(figures["argument"], figures["output"]), figures
    assert remat["temp"] <= plain["temp"], (remat, plain)


def test_parse_mesh():
    assert train_step.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert train_step.parse_mesh("data=-1") == {"data": -1}
    assert train_step.parse_mesh(" data = 1 , tensor=2") == {"data": 1, "tensor": 2}


@pytest.mark.parametrize("text", ["", "data", "data=x", "pipeline=2", "data=2,data=2", "data=0", "data=2;fsdp=4"])
def test_parse_mesh_rejects_garbage(text):
    with pytest.raises(ValueError, match=r"--mesh wants comma-separated axis=size pairs"):
        train_step.parse_mesh(text)
