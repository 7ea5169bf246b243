"""Pretraining checkpoints: exact resume, restore onto another mesh, retention, and interrupted saves."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import equivalence_config, random_batches

from chexfound_jax.jobs.checkpoint import Checkpointer
from chexfound_jax.train.setup import build_training

DATA_STATE = {"next_index": 37, "worker_states": [{"seed": 3, "pos": [1, 2]}], "epoch": 0}


def _leaves_equal(a, b):
    """Same tree, and every leaf bitwise equal with the same dtype."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def cfg():
    return equivalence_config()


@pytest.fixture(scope="module")
def training(cfg):
    """FSDP over 8 devices. Compiling a step takes most of this file's time, so both resume runs share it."""
    return build_training(cfg, {"fsdp": 8}, "fsdp")


@pytest.fixture(scope="module")
def run(training, tmp_path_factory):
    """2 steps on 8 devices, an async save at step 2, then 2 more steps while it is written: state A."""
    cfg = training.cfg
    directory = tmp_path_factory.mktemp("ckpt")
    batches = random_batches(cfg, training.batch_spec, 4)
    state = training.init_state()
    for batch in batches[:2]:
        state, _ = training.step(state, batch)
    saved = jax.device_get(state)
    ckpt = Checkpointer(directory, save_every=2, keep_last=3)
    assert ckpt.should_save(2) and not ckpt.should_save(3)
    assert ckpt.save(2, state, DATA_STATE, cfg)
    for batch in batches[2:]:  # the step donates `state`: the async save must already hold its copy
        state, _ = training.step(state, batch)
    final = jax.device_get(state)
    ckpt.close()
    return directory, saved, final, batches


def test_resume_is_bitwise_exact(cfg, training, run):
    """Restored from disk by a new Checkpointer, the run continues exactly as the uninterrupted one."""
    directory, saved, want, batches = run
    with Checkpointer(directory, save_every=2, keep_last=3) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        state, data_state, config = ckpt.restore(
            abstract_state=training.abstract_state, shardings=training.state_shardings
        )
    assert data_state == DATA_STATE
    assert config == json.loads(cfg.to_json())  # the config, as JSON (tuples read back as lists)
    assert int(state.step) == 2
    _leaves_equal(state, saved)
    for batch in batches[2:]:
        state, _ = training.step(state, batch)
    got = jax.device_get(state)
    assert int(got.step) == 4
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got.student), jax.tree.leaves(saved.student), strict=True)
    ]
    assert sum(changed) > len(changed) // 2  # the two steps after the save really moved the parameters
    _leaves_equal(got, want)


def test_restore_onto_a_smaller_mesh(cfg, run):
    """Written split 8 ways over fsdp, read straight into 2-way data x 2-way fsdp on 4 devices."""
    directory, saved, _, _ = run
    training = build_training(cfg, {"data": 2, "fsdp": 2}, "fsdp", devices=jax.devices()[:4])
    with Checkpointer(directory, save_every=2, keep_last=3) as ckpt:
        state, _, _ = ckpt.restore(2, abstract_state=training.abstract_state, shardings=training.state_shardings)
    _leaves_equal(state, saved)
    for x, want in zip(jax.tree.leaves(state), jax.tree.leaves(training.state_shardings), strict=True):
        assert x.sharding == want
        assert x.sharding.mesh.devices.size == 4
    kernel = state.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert "fsdp" in kernel.sharding.spec and len(kernel.addressable_shards) == 4
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 2  # halves, each held twice
    # Training on from the restored state is test_pretrain's 8 -> 4 device test (a second step compile here).


def _tiny(step: int) -> dict:
    return {"w": jnp.full((3,), step, jnp.float32), "step": jnp.asarray(step, jnp.int32)}


def _restore_tiny(ckpt: Checkpointer, step: int | None = None):
    abstract = jax.eval_shape(lambda: _tiny(0))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    return ckpt.restore(step, abstract_state=abstract, shardings=shardings)


def test_retention_keeps_last_n_and_every_kth(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 10):
            assert ckpt.save(step, _tiny(step), {"step": step}, {"name": "tiny"})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["4", "8", "9"]
    with Checkpointer(tmp_path, save_every=1, keep_last=2, keep_every=4) as ckpt:
        state, data_state, config = _restore_tiny(ckpt, 4)
        assert float(state["w"][0]) == 4.0 and int(state["step"]) == 4
        assert data_state == {"step": 4} and config == {"name": "tiny"}


def test_save_decision(tmp_path):
    with Checkpointer(tmp_path, save_every=3, keep_last=2, async_save=False) as ckpt:
        assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]
        assert not ckpt.save(4, _tiny(4), {}, {})  # not due: skipped
        assert ckpt.save(4, _tiny(4), {}, {}, force=True)  # e.g. the last step of the run
        assert ckpt.all_steps() == [4] and not ckpt.should_save(3)  # never behind the latest


def test_empty_directory(tmp_path):
    with Checkpointer(tmp_path / "run", save_every=1, keep_last=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "run")):
            _restore_tiny(ckpt)
        with pytest.raises(ValueError):
            Checkpointer(tmp_path, save_every=0, keep_last=1)


def test_unfinalised_step_is_ignored(tmp_path):
    """A step directory orbax had not finalised (here one named as orbax names it) never counts."""
    with Checkpointer(tmp_path, save_every=1, keep_last=5) as ckpt:
        ckpt.save(1, _tiny(1), {"step": 1}, {})
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_sharding").write_text("{}")
    with Checkpointer(tmp_path, save_every=1, keep_last=5) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        state, data_state, _ = _restore_tiny(ckpt)
        assert int(state["step"]) == 1 and data_state == {"step": 1}
    assert not partial.exists()  # removed when the directory is opened


_KILLED_MID_SAVE = """
import os, pathlib, sys, time
import jax.numpy as jnp
import numpy as np
from chexfound_jax.jobs.checkpoint import Checkpointer

root = pathlib.Path(sys.argv[1])
ckpt = Checkpointer(root, save_every=1, keep_last=5)
ckpt.save(1, {"w": jnp.ones((4,))}, {"step": 1}, {})
ckpt.wait()
big = np.random.default_rng(0).integers(0, 256, 64 * 2**20, np.uint8)  # incompressible: writing takes a while
ckpt.save(2, {"w": big}, {"step": 2}, {})
deadline = time.time() + 120
while not any(p.name.startswith("2.") for p in root.iterdir()):  # the write has begun ...
    if time.time() > deadline:
        sys.exit("no temporary directory for step 2")
    time.sleep(0.001)
os._exit(0)  # ... and the process dies before it is finalised, as on preemption
"""


def test_save_killed_midway_is_not_the_latest(tmp_path):
    root = pathlib.Path(__file__).parents[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_MID_SAVE), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert "1" in names and "2" not in names and any(n.startswith("2.") for n in names), names
    with Checkpointer(tmp_path, save_every=1, keep_last=5) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]


def test_a_checkpoint_of_another_state_is_refused_by_name(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep_last=1, async_save=False) as ckpt:
        ckpt.save(2, {"w": jnp.zeros((4,), jnp.float32), "step": jnp.int32(2)}, {}, {"head": {"kind": "linear"}})
    with Checkpointer(tmp_path, save_every=1, keep_last=1) as ckpt:
        assert ckpt.saved_config() == {"head": {"kind": "linear"}}  # read without the state
        with pytest.raises(ValueError, match=rf"{tmp_path} step 2 does not fit this run's state.*\(3,\)"):
            _restore_tiny(ckpt)  # w is (3,) here


def test_damage_is_told_apart_from_another_configuration(tmp_path):
    from chexfound_jax.jobs.checkpoint import DamagedCheckpointError

    state = {"w": jnp.arange(60.0).reshape(6, 10), "b": jnp.ones(7)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    with Checkpointer(tmp_path, save_every=1, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"step": step}, {})
    metadata = tmp_path / "2" / "state" / "_METADATA"
    metadata.write_text(metadata.read_text()[:50])  # a copy cut short
    with Checkpointer(tmp_path, save_every=1, keep_last=3) as ckpt:
        with pytest.raises(DamagedCheckpointError, match=r"step 2 is damaged: .*state/_METADATA"):
            ckpt.restore(2, abstract_state=state, shardings=shardings)
        other = {"w": jnp.zeros((3, 3)), "b": jnp.ones(7)}
        with pytest.raises(ValueError, match="step 1 does not fit this run's state") as info:
            ckpt.restore(1, abstract_state=other, shardings=shardings)
        assert not isinstance(info.value, DamagedCheckpointError)
        step, restored, data, _ = ckpt.restore_newest(abstract_state=state, shardings=shardings)
        assert step == 1 and data == {"step": 1} and float(restored["b"][0]) == 2.0
        assert (tmp_path / "2.damaged" / "state" / "_METADATA").exists() and ckpt.all_steps() == [1]
        (tmp_path / "1" / "state" / "_METADATA").write_text("{")
        with pytest.raises(DamagedCheckpointError, match="no checkpoint restores whole"):
            ckpt.restore_newest(abstract_state=state, shardings=shardings)
