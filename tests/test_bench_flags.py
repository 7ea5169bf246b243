"""The benches' command lines: importing a bench claims no flag name (twice: no DuplicateFlagError), each renamed
flag's new name is one the bench defines, and an old spelling ends the program with one line naming the new one."""

import importlib
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from bench import command_line

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
def test_renamed_flags_name_flags_the_bench_defines(name):
    module = importlib.import_module(f"bench.{name}")
    renamed = getattr(module, "RENAMED", {})
    if not hasattr(module, "define_flags"):
        assert not renamed
        return
    defined = flags.FlagValues()
    module.define_flags(defined)
    for old, new in renamed.items():
        assert new in defined and old not in defined, (old, new)
        for arg in (f"--{old}=1", f"--{old}", f"-{old}=1"):
            assert command_line.renamed_in(["prog", "--other=1", arg], renamed) == f"--{old} was renamed --{new}"


def test_prepare_exits_on_an_old_spelling_and_adds_the_default_config():
    renamed = {"json": "out", "batch": "batch_size"}
    with pytest.raises(SystemExit, match=r"^FATAL Flags parsing error: --batch was renamed --batch_size$"):
        command_line.prepare(["prog", "--out=x", "--batch", "3"], renamed)
    # Not an old name: a new one that starts like it, a value, anything after "--".
    assert command_line.renamed_in(["prog", "--batch_size=2", "--out=--json", "--", "--json"], renamed) is None
    assert command_line.prepare(["prog", "--config.a=1"], {}, "c.py") == ["prog", "--config=c.py", "--config.a=1"]
    for argv in (["prog", "--config=d.py"], ["prog", "--config", "d.py", "--config.a=1"]):
        assert command_line.prepare(argv, {}, "c.py") == argv


def test_an_old_spelling_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loader_throughput", "--json=x.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.strip() == "FATAL Flags parsing error: --json was renamed --out"
