"""Test session set-up: 8 simulated CPU devices (before jax is imported) and parsed absl flags."""

import atexit
import os
import shutil
import tempfile

# LLVM optimisation of the XLA:CPU code off: the suite's time is mostly compiling tiny models, whose runs do
# not need optimised code (about a fifth less wall time); every comparison is within one setting.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the subprocesses it starts: many tests compile
# the same tiny train step in fresh processes (multi-host, preemption), and XLA compiles dominate there.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="chexfound-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import importlib.util
import pathlib

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


def pytest_collection_modifyitems(config, items):
    """`torch`-marked tests skip, with the reason, where PyTorch (an optional extra) is not installed; where it
    is, they import it themselves and any import error fails them."""
    if importlib.util.find_spec("torch") is not None:
        return
    skip = pytest.mark.skip(reason="needs PyTorch, which is not installed (the [torch] extra)")
    for item in items:
        if item.get_closest_marker("torch"):
            item.add_marker(skip)
