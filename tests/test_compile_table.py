"""bench/compile_table.py: one Markdown row per compile_check report, figures converted by hand."""

from bench import compile_table

GIB = 1024**3


def _report(**changes):
    r = {
        "topology": "v5p-8",
        "num_devices": 4,
        "rules": "fsdp",
        "mesh": {"fsdp": 4},
        "per_device_batch": 32,
        "model": {"remat": "dots"},
        "hbm_bytes": 95 * GIB,
        "fits": True,
        "compile_s": 320.4,
        "memory": {"peak": 42.5 * GIB, "temp": 40.25 * GIB},
        "flops_per_device": {"recompute_overhead": 0.048},
        "collectives_per_device": {"all-gather": {"bytes": 3 * GIB}, "all-reduce": {"bytes": 1.5 * GIB}},
        "roofline": {"step_s_lower_bound": 0.31, "bound_by": "compute"},
    }
    r.update(changes)
    return r


def test_row_by_hand():
    row = compile_table.row(_report())
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["v5p-8 (4)", "fsdp, {'fsdp': 4}", "32", "dots", "42.50 (40.25)"]
    assert cells[5:] == ["95", "yes", "4.8%", "4.50", "310 (compute)", "320"]


def test_a_report_that_did_not_compile_says_why():
    r = _report(fits=False, error="RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
    del r["memory"]
    assert "no (RESOURCE_EXHAUSTED" in compile_table.row(r)
