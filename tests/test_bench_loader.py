"""bench/loader_throughput.py: a smoke run of main on the tiny config (no torchvision), and its helpers."""

import json
import os

import pytest

from bench import loader_throughput as lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "pretrain", "tiny_cpu.py")


def test_main_on_the_tiny_config_without_torchvision(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = [f"--config={TINY}", "--sizes=config", "--workers=0", "--images=8", "--batch=2", "--repeats=2"]
    result = lt.main([*argv, "--prep_size=96", "--device_repeats=1", f"--json={out}"])

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
    assert json.loads(out.read_text())["cells"][0]["impl"] == "ours-device"

    printed = capsys.readouterr().out
    assert "| 64/32 | ours-device | 0 |" in printed and "| 64/32 | ours-host | 0 |" in printed
    assert "torchvision comparison skipped" in printed


def test_parse_sizes():
    assert lt.parse_sizes("512/144,224/96") == [(512, 144), (224, 96)]
    assert lt.parse_sizes("config") == [None]
    for bad in ("512", "512x144", "0/96", "a/b"):
        with pytest.raises(ValueError, match="--sizes"):
            lt.parse_sizes(bad)


def test_plan_windows_are_whole_rounds_over_the_workers():
    assert lt.plan(30, 10, 0) == (1, 3)
    assert lt.plan(30, 10, 2) == (4, 4)
    assert lt.plan(1, 10, 0) == (1, 1)


def test_tree_cpu_counts_this_process():
    before = lt.tree_cpu()
    sum(i * i for i in range(300_000))
    after = lt.tree_cpu()
    assert os.getpid() in after and lt.cpu_between(before, after) >= 0
