"""bench/loader_throughput.py: a smoke run on the tiny config (no torchvision), its helpers, and the torchvision
side's command line in an interpreter without absl or jax."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import time

import pytest

from bench import cpu_timing
from bench import loader_throughput as lt
from configs.pretrain import tiny_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_on_the_tiny_config_without_torchvision(capsys):
    options = lt.Options(crop_sizes=(None,), workers=(0,), images=8, batch_size=2, repeats=2)
    result = lt.run(tiny_cpu.get_config(), dataclasses.replace(options, prep_size=96, device_repeats=1))
    lt.print_report(result)

    assert result["torchvision"] == "skipped: no --torchvision_python"
    assert result["data"]["records"] == result["data"]["exported"] == 24
    assert [(c["size"], c["impl"], c["workers"]) for c in result["cells"]] == [
        ("64/32", "ours-device", 0),
        ("64/32", "ours-host", 0),
    ]
    for cell in result["cells"]:
        assert len(cell["windows"]) == 2
        assert all(w["images"] == 8 and w["wall_s"] > 0 for w in cell["windows"])
        assert cell["images_per_s"] > 0 and cell["images_per_s_best"] >= cell["images_per_s"]
        assert cell["cpu_ms_per_image"] > 0
        assert cell["ratio_per_core"] is None and cell["ratio_images_per_s"] is None
    (fod,) = result["finish_on_device"]
    assert fod["size"] == "64/32" and fod["ms_per_image"] > 0
    assert json.loads(json.dumps(result))["cells"][0]["impl"] == "ours-device"  # what --out writes

    printed = capsys.readouterr().out
    assert "| 64/32 | ours-device | 0 |" in printed and "| 64/32 | ours-host | 0 |" in printed
    assert "torchvision comparison skipped" in printed


def test_parse_crop_sizes():
    assert lt.parse_crop_sizes("512/144,224/96") == [(512, 144), (224, 96)]
    assert lt.parse_crop_sizes("config") == [None]
    for bad in ("512", "512x144", "0/96", "a/b"):
        with pytest.raises(ValueError, match="--crop_sizes"):
            lt.parse_crop_sizes(bad)
    with pytest.raises(ValueError, match="--workers"):
        lt.Options(workers=(-1,))


def test_plan_windows_are_whole_rounds_over_the_workers():
    assert cpu_timing.plan(30, 10, 0) == (1, 3)
    assert cpu_timing.plan(30, 10, 2) == (4, 4)
    assert cpu_timing.plan(1, 10, 0) == (1, 1)


def test_tree_cpu_counts_this_process():
    start, before = time.process_time(), cpu_timing.tree_cpu()
    while time.process_time() - start < 0.3:  # 30 clock ticks of CPU work, so the tick rounding is small
        sum(i * i for i in range(10_000))
    after, spent = cpu_timing.tree_cpu(), time.process_time() - start
    assert os.getpid() in after
    # This process has no children that work meanwhile: the tree's CPU is this process's own CPU time.
    assert cpu_timing.cpu_between(before, after) == pytest.approx(spent, abs=0.05)


def test_cpu_between_counts_new_processes_in_full_and_ignores_ended_ones():
    before = {1: 2.0, 2: 5.0, 3: 1.0}  # 3 ends in between; 4 starts
    after = {1: 2.5, 2: 5.25, 4: 0.125}
    assert cpu_timing.cpu_between(before, after) == 0.5 + 0.25 + 0.125


def test_torchvision_side_needs_neither_absl_nor_jax(tmp_path):
    """The other interpreter runs the file as a script (bench/ on sys.path, no project packages); without OUT_JSON
    it stops with its usage line, after importing everything it imports before torch."""
    blocked = "import sys; sys.modules.update(absl=None, jax=None, ml_collections=None, chexfound_jax=None, bench=None)"
    script = os.path.join(REPO, "bench", "loader_torchvision.py")
    code = f"{blocked}; sys.path.insert(0, {os.path.dirname(script)!r}); sys.argv = [{script!r}]; "
    code += f"import runpy; runpy.run_path({script!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "usage:" in proc.stderr and "OUT_JSON < SPEC_JSON" in proc.stderr, proc.stderr


def test_torchvision_side_reads_its_spec_on_stdin(tmp_path, monkeypatch):
    from bench import loader_torchvision

    monkeypatch.setattr(loader_torchvision, "torchvision_child", lambda spec: {"cells": [], "spec": spec})
    out = tmp_path / "torchvision.json"
    loader_torchvision.child_main(["loader_torchvision.py", str(out)], io.StringIO('{"batch": 2}'))
    assert json.loads(out.read_text()) == {"cells": [], "spec": {"batch": 2}}
