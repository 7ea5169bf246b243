"""bench/gpu_check: the --smoke run end to end on the CPU (every section with figures), the shell wrapper's
syntax, and the target verdicts."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from bench import gpu_check_photometry, gpu_check_report

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "vit_forward", "finish_on_device", "compile_check", "train_step")


def _errors(node, path="$"):
    """Paths of every "error" entry in the JSON (the smoke run must have none)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "error":
                yield f"{path}.error: {v}"
            else:
                yield from _errors(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _errors(v, f"{path}[{i}]")


def test_smoke_run_writes_every_section_with_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)  # set by the check itself, before the backend starts
    # One CPU device is what the smoke run uses; the test session's 8 simulated ones would only add threads.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--smoke", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall_s = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not list(_errors(result)), list(_errors(result))

    assert result["mode"] == "smoke"
    for name in SECTIONS:
        assert result[name]["status"] == "ok", (name, result[name])
    # Seconds (rounded to 0.1): the sections run one after another inside the run, which the subprocess's
    # own wall time bounds. A unit or clock mistake (ms, a start time) would break the sum.
    sections_s = [result[name]["section_s"] for name in SECTIONS]
    assert min(sections_s) >= 0 and sum(sections_s) <= result["total_s"] + 0.05 * (len(SECTIONS) + 1), result
    assert result["total_s"] <= wall_s, (result["total_s"], wall_s)

    env_ = result["environment"]
    assert env_["jax"] and env_["device_kind"] and env_["devices_used"] == 1
    assert env_["platform"] == "cpu" and env_["chip"] is None and env_["peak_bf16_flops"] is None
    assert env_["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92", env_["env"]
    assert result["args"]["per_device_batches"] == [4, 2] and result["args"]["out"] == str(out), result["args"]

    forward = result["vit_forward"]
    assert forward["gflop_per_image"] > 0 and forward["runs"], forward
    for run in forward["runs"]:
        assert run["status"] == "ok" and run["images_per_s"] > 0 and run["tflops"] > 0, run

    fod = result["finish_on_device"]
    assert fod["ms_per_image"] > 0 and 0 <= fod["compile_s"] <= fod["section_s"] + 0.05, fod
    assert fod["output_shapes"]["global_crops"] == [1, 2 * fod["images"], 64, 64, 3], fod

    cc = result["compile_check"]
    report = cc["reports"][0]
    assert report["status"] == "ok" and report["memory"]["peak"] > 0 and report["fits"] is None, report
    assert report["flops_per_device"]["analytic_executed"] > 0, report
    assert cc["largest_fitting_batch"] == report["per_device_batch"]

    runs = {r["attention_impl"]: r for r in result["train_step"]["runs"]}
    assert sorted(runs) == ["cudnn", "xla"], runs
    assert runs["cudnn"]["status"].startswith("skipped: cuDNN attention needs a GPU"), runs
    timed = runs["xla"]  # with the tiny config's own remat: the compile check's step, from the persistent cache
    assert timed["status"] == "ok", timed
    assert timed["per_device_batch"] == cc["largest_fitting_batch"] and timed["timed_steps"] == 1, timed
    for key in ("step_ms", "images_per_s", "tflops_executed", "tflops_nominal", "loss"):
        assert timed[key] > 0, (key, timed)
    assert 0 <= timed["compile_s"] <= result["train_step"]["section_s"] + 0.05, timed
    assert timed["images_per_s"] == pytest.approx(timed["global_batch"] / (timed["step_ms"] / 1e3)), timed
    assert timed["tflops_nominal"] >= timed["tflops_executed"], timed
    assert "mfu_executed_pct" not in timed  # no peak FLOP/s for a CPU

    targets = result["targets"]
    assert targets["mfu_target_met"] is None and targets["best_mfu_executed_pct"] is None, targets
    summary = "\n".join(result["summary"])
    assert "60% MFU" in summary and "32 per 80 GB" in summary and "finish_on_device" in summary, summary
    assert "gpu_check (smoke)" in proc.stdout


def test_shell_wrapper_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def _report(batch, peak, fits=None, hbm=80e9):
    return {"status": "ok", "per_device_batch": batch, "memory": {"peak": peak}, "fits": fits, "hbm_bytes": hbm}


def test_fit_verdict_for_32_per_80gb():
    gb = 1e9
    fit_verdict = gpu_check_report._fit_verdict
    assert fit_verdict([_report(64, 70 * gb, True)]) is True  # a larger batch fits: 32 does
    assert fit_verdict([_report(64, 100 * gb, False), _report(48, 75 * gb, True)]) is True
    assert fit_verdict([_report(32, 81 * gb, False)]) is False
    # Fits an H200 at 64, 90 GB: says nothing about 32 in 80 GB.
    assert fit_verdict([_report(64, 90 * gb, True, hbm=141e9)]) is None
    # Out of memory at compile (no buffer figures) on an 80 GB chip at 16: 32 cannot fit either.
    assert fit_verdict([{"status": "ok", "per_device_batch": 16, "fits": False, "hbm_bytes": 80e9}]) is False
    assert fit_verdict([{"per_device_batch": 64, "status": "skipped: time budget"}]) is None


def test_mfu_verdict_needs_32_images():
    def run(batch, mfu):
        return {
            "status": "ok",
            "attention_impl": "cudnn",
            "remat": "dots",
            "per_device_batch": batch,
            "mfu_executed_pct": mfu,
        }

    def verdict(runs, fits=True):
        return gpu_check_report.verdicts({"compile_check": {"fits_32_per_80gb": fits}, "train_step": {"runs": runs}})

    assert verdict([run(48, 61.0)])["mfu_target_met"] is True
    assert verdict([run(48, 59.0), run(32, 55.0)])["mfu_target_met"] is False
    assert verdict([run(16, 70.0)], fits=None)["mfu_target_met"] is None  # 32 not measured
    assert verdict([run(16, 70.0)], fits=False)["mfu_target_met"] is False  # 32 does not even fit
    assert verdict([run(48, 61.0)])["best_combo"] == "cudnn/dots at 48"


def test_pipeline_step_copies_match_the_pipeline():
    """The fallback for an image without grain / tensorflow_datasets makes the pipeline's batch and output."""
    import jax
    import numpy as np

    from chexfound_jax.data import pipeline
    from configs.pretrain import tiny_cpu

    cfg = tiny_cpu.get_config()
    assert gpu_check_photometry.PARAM_PREFIX == pipeline.PARAM_PREFIX
    ours, _ = gpu_check_photometry.pipeline_batch(cfg, 2, np.random.default_rng(0), None)
    theirs, _ = gpu_check_photometry.pipeline_batch(cfg, 2, np.random.default_rng(0), pipeline)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
        assert ours[k].dtype == theirs[k].dtype, k
    assert theirs["global_crops"].dtype == np.uint8 and theirs["global_crops"].shape == (1, 4, 64, 64)
    keys = [k for k in theirs if k not in ("skipped", "record_index")]
    arrays = jax.device_put({k: theirs[k] for k in keys})
    a, b = gpu_check_photometry._finish(arrays, cfg), pipeline.finish_on_device(arrays, cfg)
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
