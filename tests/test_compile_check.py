"""chexfound_jax/compile_check.py: the real train step compiled by XLA:TPU (libtpu, deviceless) for a v5p-8
(4 chips) that is not there, and the report built from it.

The tiny config is widened (embed 512, head widths 512, 4096 prototypes) so that the parameters and their
optimiser state dominate the per-chip buffers, and every sharded dimension stays a multiple of the TPU's
128-lane tiles (XLA:TPU pads smaller minor dimensions, which would blur the 1/4 of FSDP). Each TPU compile
of the step takes half a minute on a CPU, so the module compiles it twice, concurrently: the command line
end to end in a subprocess with rules fsdp, and check() in this process with rules data_parallel.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import app

from chexfound_jax import compile_check
from chexfound_jax.parallel import hlo_stats
from chexfound_jax.parallel import topology as topology_lib
from chexfound_jax.train.setup import build_training
from configs.pretrain import tiny_cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDER = {"model.embed_dim": 512, "model.num_heads": 8, "dino.head_hidden_dim": 512, "ibot.head_hidden_dim": 512}
WIDER.update({"dino.head_n_prototypes": 4096, "ibot.head_n_prototypes": 4096})
PER_DEVICE_BATCH = 2
# What quiet_libtpu sets: the subprocess must do it itself for the stderr check to mean anything.
QUIET_VARS = (
    "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
    "TPU_SKIP_MDS_QUERY", "TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", "JAX_PLATFORMS",
)  # fmt: skip


def _config():
    cfg = tiny_cpu.get_config()
    for key, value in WIDER.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def _nbytes(tree) -> int:
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "fit.json"
    command = [
        sys.executable, "-m", "chexfound_jax.compile_check", "--config=configs/pretrain/tiny_cpu.py",
        "--topology=v5p-8", f"--per_device_batch={PER_DEVICE_BATCH}", "--mesh=fsdp=-1", "--rules=fsdp",
        f"--out={out}", *(f"--config.{k}={v}" for k, v in WIDER.items()),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    cli = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        topo = topology_lib.get_topology("v5p:2x2x1")
        data_parallel = compile_check.check(_config(), topo, PER_DEVICE_BATCH, {"fsdp": 4}, "data_parallel")
        cfg = compile_check.job_config(_config(), PER_DEVICE_BATCH, len(topo.devices))
        training = build_training(cfg, {"fsdp": 4}, "fsdp", topo.devices)
        stdout, stderr = cli.communicate(timeout=900)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, stderr[-4000:]
    return {
        "fsdp": json.loads(out.read_text()),
        "data_parallel": data_parallel,
        "stdout": stdout,
        "stderr": stderr,
        "state_bytes": _nbytes(training.abstract_state),
        "batch_bytes_per_device": _nbytes(training.batch_spec) / len(topo.devices),
    }


@pytest.mark.parametrize("rules", ["fsdp", "data_parallel"])
def test_report(runs, rules):
    r = runs[rules]
    assert (r["topology"], r["jax_topology"], r["num_slices"]) == (
        ("v5p-8", "v5p:2x2x1", 1) if rules == "fsdp" else ("v5p:2x2x1", "v5p:2x2x1", 1)
    )
    assert (r["chip"], r["device_kind"], r["num_devices"], r["mesh"], r["rules"]) == (
        "TPU v5p",
        "TPU v5",
        4,
        {"fsdp": 4},
        rules,
    )
    assert (r["per_device_batch"], r["global_batch"], r["batch_groups"]) == (2, 8, 4)
    assert r["model"]["arch"] == "vit_small" and r["model"]["crops"] == "2x64 + 2x32"
    assert r["hbm_bytes"] == 95 * 1024**3

    m = r["memory"]
    assert all(m[k] > 0 for k in ("argument", "output", "temp", "alias")), m
    assert m["peak"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    assert r["fits"] is True and m["peak"] < r["hbm_bytes"]
    assert r["compile_s"] > 0

    f = r["flops_per_device"]
    assert f["unknown_loop_trip_counts"] == 0
    assert f["analytic_nominal"] >= f["analytic_executed"] > 0
    # Full remat recomputes the forward of every block: the compiled count is the executed one and more.
    assert f["compiled_matmul"] >= 0.9 * f["analytic_executed"], f
    assert f["recompute_overhead"] == pytest.approx(f["compiled_matmul"] / f["analytic_executed"] - 1)

    collectives = r["collectives_per_device"]
    assert set(collectives) == set(hlo_stats.COLLECTIVES)
    for kind, stats in collectives.items():
        assert set(stats) == {"count", "bytes", "ring_traffic_bytes"}
        assert (stats["count"] == 0) == (stats["bytes"] == 0), (kind, stats)  # every collective moves data
        # Ring model: an all-reduce sends 2 (n - 1) / n of its buffer, the others (n - 1) / n, a permute all of it.
        assert 0 <= stats["ring_traffic_bytes"] <= (2 if kind == "all-reduce" else 1) * stats["bytes"], (kind, stats)
    assert collectives["all-reduce"]["count"] > 0  # the global batch's sums and (data parallel) the gradients
    if rules == "fsdp":
        # FSDP gathers the weights it computes with; data parallel has them all.
        assert collectives["all-gather"]["bytes"] > 0
    else:
        assert collectives["all-gather"]["count"] == 0

    roofline = r["roofline"]
    assert roofline["step_s_lower_bound"] > 0
    assert roofline["step_s_lower_bound"] == max(roofline["compute_s"], roofline["hbm_s"], roofline["interconnect_s"])
    assert roofline["compute_s"] == pytest.approx(f["compiled_matmul"] / 459e12)
    assert roofline["images_per_s_upper_bound"] == pytest.approx(8 / roofline["step_s_lower_bound"])


def test_fsdp_splits_the_state_over_the_four_chips(runs):
    state, batch = runs["state_bytes"], runs["batch_bytes_per_device"]
    fsdp, replicated = runs["fsdp"]["memory"]["argument"], runs["data_parallel"]["memory"]["argument"]
    assert replicated >= state  # every chip holds all of student, teacher, AdamW moments
    assert fsdp <= 0.35 * state + batch
    assert 0.2 <= fsdp / replicated <= 0.4, (fsdp, replicated)


def test_cli_prints_the_report_and_libtpu_stays_quiet(runs):
    stdout, stderr = runs["stdout"], runs["stderr"]
    assert "topology v5p-8 (v5p:2x2x1, 1 slice(s)): 4 x TPU v5p; mesh {'fsdp': 4}, rules fsdp" in stdout
    assert "of 95.0 GiB HBM: fits" in stdout and "roofline: " in stdout
    for noise in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "libtpu_lockfile"):
        assert noise not in stderr, stderr[-4000:]


@pytest.fixture
def stub_compile(monkeypatch):
    """check() with a small CPU program in place of the step's compile (a CPU compile of the step costs
    half a minute; what is under test here is the report around it)."""

    def fake(training, compiler_options=None):
        compiled = jax.jit(lambda x: jnp.tanh(x @ x)).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
        return compiled, 0.25

    monkeypatch.setattr(compile_check, "compile_abstract", fake)


def test_local_cpu_topology_fits_none(stub_compile):
    topo = topology_lib.get_topology("local")
    r = compile_check.check(tiny_cpu.get_config(), topo, PER_DEVICE_BATCH)
    assert (r["chip"], r["device_kind"], r["num_devices"], r["mesh"]) == ("cpu", "cpu", 8, {"data": 8, "fsdp": 1})
    assert r["fits"] is None and r["hbm_bytes"] is None and "roofline" not in r
    assert r["flops_per_device"]["compiled_matmul"] == 2 * 64**3
    assert "HBM" not in compile_check.format_report(r)
    json.dumps(r)


def test_out_of_memory_is_a_report_not_an_error(monkeypatch):
    def oom(training, compiler_options=None):
        raise RuntimeError(
            "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm."
        )

    monkeypatch.setattr(compile_check, "compile_abstract", oom)
    r = compile_check.check(tiny_cpu.get_config(), topology_lib.get_topology("local"), PER_DEVICE_BATCH)
    assert r["fits"] is False and r["error"].startswith("RESOURCE_EXHAUSTED")
    assert "does NOT fit: RESOURCE_EXHAUSTED" in compile_check.format_report(r)

    def broken(training, compiler_options=None):
        raise ValueError("not about memory")

    monkeypatch.setattr(compile_check, "compile_abstract", broken)
    with pytest.raises(ValueError, match="not about memory"):
        compile_check.check(tiny_cpu.get_config(), topology_lib.get_topology("local"), PER_DEVICE_BATCH)


def test_job_config():
    cfg = compile_check.job_config(tiny_cpu.get_config(), 4, 8, groups_per_device=2)
    assert (cfg.train.global_batch_size, cfg.train.batch_groups) == (32, 16)
    for per_device, groups in ((0, 1), (3, 2)):
        with pytest.raises(ValueError, match="positive multiple"):
            compile_check.job_config(tiny_cpu.get_config(), per_device, 8, groups)


def _search(largest: int, **kwargs) -> tuple[int, list[int]]:
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= largest

    return compile_check.search_max_batch(fits, **kwargs), tried


@pytest.mark.parametrize("largest", [37, 0, 1, 5, 8, 9, 100])
def test_search_max_batch(largest):
    found, tried = _search(largest, start=8, limit=4096)
    assert found == largest, tried
    assert all(b >= 1 for b in tried) and len(tried) == len(set(tried))


def test_max_batch_search_prints_every_report_and_needs_a_known_hbm(capsys):
    run = lambda b: {"batch": b, "fits": b <= 20}
    out = compile_check.max_batch_search(run, 8, "TPU v5p", lambda r: f"batch {r['batch']}: {r['fits']}")
    tried = [r["batch"] for r in out["reports"]]
    assert out["max_per_device_batch"] == 20 and tried == sorted(tried) and {8, 16, 20, 21, 32} <= set(tried)
    assert capsys.readouterr().out.split("\n\n")[:2] == ["batch 8: True", "batch 16: True"]
    with pytest.raises(app.UsageError, match="cpu: no HBM capacity known"):
        compile_check.max_batch_search(lambda b: {"fits": None}, 8, "cpu", str)


def test_search_max_batch_limits():
    assert _search(37)[1][:4] == [8, 16, 32, 64]  # doubling from start, then bisection
    assert _search(10**6, limit=100) == (100, [8, 16, 32, 64, 100])
    assert _search(10**6, start=8, limit=5) == (5, [5])
    assert _search(0, start=1) == (0, [1])
