"""The benches' command lines: importing a bench claims no flag name (twice: no DuplicateFlagError), each renamed
flag's new name is one the bench defines, and an old spelling ends the program with one line naming the new one
(data_prep.retired_flags, as every program); a bench's default config file parses like a given one."""

import importlib
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from chexfound_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py"))


def _modules():
    return [importlib.import_module(f"bench.{name}") for name in BENCHES]


def test_importing_a_bench_twice_defines_no_flag():
    modules = _modules()  # the libraries they import may define flags of their own (tfds does)
    before = set(flags.FLAGS)
    for module in modules:
        importlib.reload(module)
    assert set(flags.FLAGS) == before
    assert not [name for name in flags.FLAGS.flags_by_module_dict() if name.startswith("bench")]


@pytest.mark.parametrize("name", BENCHES)
def test_an_old_flag_name_ends_the_bench_naming_the_new_one(name):
    module = importlib.import_module(f"bench.{name}")
    renamed = getattr(module, "RENAMED", {})
    if not hasattr(module, "define_flags"):
        assert not renamed
        return
    defined = flags.FlagValues()
    module.define_flags(defined)
    for old, new in renamed.items():
        assert new in defined and defined[new].flag_type() != "retired", (old, new)
        for arg in (f"--{old}=1", f"--{old}", f"-{old}=1", f"--no{old}"):
            defined.unparse_flags()
            with pytest.raises(SystemExit) as e:
                defined(["prog", "--other=1", arg])  # before the unknown --other is reported
            line = str(e.value)
            assert line.startswith(f"FATAL Flags parsing error: --{old} ") and f"--{new}" in line, (arg, line)


def test_the_default_config_goes_first_unless_one_is_given():
    assert cli.with_default_config(["prog", "--config.a=1"], "c.py") == ["prog", "--config=c.py", "--config.a=1"]
    for argv in (["prog", "--config=d.py"], ["prog", "--config", "d.py", "--config.a=1"], ["prog", "-config=d.py"]):
        assert cli.with_default_config(argv, "c.py") == argv
    # After "--" an argument is positional, not a flag.
    assert cli.with_default_config(["prog", "--", "--config=d.py"], "c.py")[1] == "--config=c.py"


def test_an_old_spelling_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loader_throughput", "--json=x.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.strip() == "FATAL Flags parsing error: --json was renamed --out"


def test_a_bad_override_of_the_default_config_ends_the_bench_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train_step", "--config.model.atention_impl=xla", "--memory_only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown config key 'atention_impl'" in proc.stderr.strip().splitlines()[-1]
