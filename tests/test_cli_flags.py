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
