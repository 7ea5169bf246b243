"""Programs define their flags only when run: importing one claims no flag name, and a program rejects the
flags of another (run_sample used to accept --checkpoint, defined by embed on import)."""

import ast
import subprocess
import sys

PROGRAMS = ("chexfound_jax.embed", "chexfound_jax.convert.__main__", "chexfound_jax.run_sample", "data_prep.build")


def test_importing_a_program_defines_no_flags():
    own = ("checkpoint", "out", "to", "layout", "batch_size", "workdir", "data_dir", "source", "output")
    code = "from absl import flags\n" + "".join(f"import {m}\n" for m in PROGRAMS) + "print(sorted(flags.FLAGS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    defined = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "verbosity" in defined and not defined & set(own)  # absl's own flags only


def test_a_program_rejects_another_programs_flag(tmp_path):
    cmd = [sys.executable, "-m", "chexfound_jax.run_sample", f"--workdir={tmp_path}", "--checkpoint=weights"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0 and "Unknown command line flag 'checkpoint'" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def _pretrain(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "chexfound_jax.pretrain", "--config=configs/pretrain/tiny_cpu.py", *overrides]
    return subprocess.run([*cmd, f"--workdir={tmp_path}"], capture_output=True, text=True)


def test_a_mistyped_config_key_ends_the_program_in_one_line(tmp_path):
    out = _pretrain(tmp_path, "--config.model.atention_impl=xla")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "unknown config key 'atention_impl'" in last and '"attention_impl"' in last
    assert "--config.model.atention_impl" in last


def test_a_missing_dataset_ends_the_program_in_one_line(tmp_path):
    out = _pretrain(tmp_path, "--config.data.datasets=('/nonexistent/ds',)")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "pretrain: data.datasets: /nonexistent/ds does not exist"


def test_library_info_records_are_dropped_unless_verbose():
    import logging

    from absl import logging as absl_logging

    from chexfound_jax import cli

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    library = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = cli.PROJECT_ROOTS[0] + "/pretrain.py"
    keep = cli.LibraryInfoFilter().filter
    assert keep(record(logging.INFO, ours)) and keep(record(logging.WARNING, library))
    assert not keep(record(logging.INFO, library))
    before = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(1)  # --verbosity=1: everything
        assert keep(record(logging.INFO, library))
    finally:
        absl_logging.set_verbosity(before)
