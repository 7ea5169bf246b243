"""Programs define their flags only when run: importing one claims no flag name, and a program rejects the
flags of another (run_sample used to accept --checkpoint, defined by embed on import). One name per role
in every program (the benches: tests/test_bench_flags.py); an old name ends the program naming the new one."""

import ast
import json
import subprocess
import sys

PROGRAMS = (
    "chexfound_jax.pretrain",
    "chexfound_jax.evaluate",
    "chexfound_jax.embed",
    "chexfound_jax.run_sample",
    "chexfound_jax.compile_check",
    "chexfound_jax.experiments.miniature",
    "chexfound_jax.convert.__main__",
    "data_prep.build",
    "data_prep.audit",
)
# The project's name for a role, and the names it had (or could have) elsewhere: these are retired, if defined.
ROLES = {
    "workdir": ("output", "output_dir", "out_dir", "outdir", "logdir"),  # a job's output directory
    "out": ("json", "output_file", "out_file"),  # a single output file
    "batch_size": ("batch", "bs"),
    "image_size": ("resolution", "img_size"),
    "checkpoint": ("weights", "ckpt", "pretrained_weights"),  # a weights directory or a PyTorch .pth
    "data_dir": ("data",),
}


def test_importing_a_program_defines_no_flags():
    own = ("checkpoint", "out", "to", "layout", "batch_size", "workdir", "data_dir", "source", "output", "config")
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


def test_every_program_names_each_role_one_way():
    """Each program's define_flags() run in turn (its flags removed before the next): an old name of a role is
    only ever a retired flag, which ends the program naming the new one."""
    code = """import importlib, json, sys
from absl import flags
found = {}
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    before = set(flags.FLAGS)
    module.define_flags()
    new = sorted(set(flags.FLAGS) - before)
    found[name] = {f: flags.FLAGS[f].flag_type() for f in new}
    for f in new:
        delattr(flags.FLAGS, f)
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code, *PROGRAMS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(found) == set(PROGRAMS)
    for program, defined in found.items():
        for old in (o for olds in ROLES.values() for o in olds):
            assert defined.get(old, "retired") == "retired", (program, old)
    convert = found["chexfound_jax.convert.__main__"]  # --source is data_prep.build's dataset adapter there
    assert convert["source"] == convert["no_heads"] == "retired" and convert["heads"] == "bool" and "network" in convert


def test_an_old_flag_name_ends_the_program_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "chexfound_jax.compile_check", f"--json={tmp_path / 'fit.json'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == "FATAL Flags parsing error: --json was renamed --out"
    assert not any(tmp_path.iterdir())
