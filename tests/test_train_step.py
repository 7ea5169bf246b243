"""The sharded student/EMA-teacher train step on 8 simulated CPU devices."""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import portpicker
import pytest
from helpers import DATA, equivalence_config, random_batches, run_processes, setup_train
from PIL import Image

from chexfound_jax.data.collate import collate
from configs.pretrain import tiny_cpu


def _setup(cfg, mesh_axes, rules, devices=None):
    state, step, spec, _ = setup_train(cfg, mesh_axes, rules, devices)
    return state, step, spec


@pytest.fixture(scope="module")
def cfg():
    return equivalence_config()


@pytest.fixture(scope="module")
def reference(cfg):
    """Two steps on one device: the truth the sharded runs must reproduce (states: initial, after each step)."""
    state, step, spec = _setup(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])
    batches = random_batches(cfg, spec, 2)
    states, metrics = [jax.device_get(state)], []
    for batch in batches:
        state, m = step(state, batch)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics, batches


# fsdp over all 8 devices takes the same code path as the fsdp axis of dp4xfsdp2, which shards both ways.
@pytest.mark.parametrize(
    "mesh_axes,rules", [({"data": 8}, "data_parallel"), ({"data": 4, "fsdp": 2}, "fsdp")], ids=["dp8", "dp4xfsdp2"]
)
def test_sharded_step_equals_single_device(cfg, reference, mesh_axes, rules):
    states, want_metrics, batches = reference
    want_state = states[-1]
    state, step, _ = _setup(cfg, mesh_axes, rules)
    if rules == "fsdp":
        kernel = state.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
        assert "fsdp" in kernel.sharding.spec  # parameters really are split
    for batch, want in zip(batches, want_metrics, strict=True):
        state, got = step(state, batch)
        for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
        for key in ("grad_norm/backbone", "grad_norm/dino_head", "grad_norm/ibot_head", "update_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
    got_state = jax.device_get(state)
    for model in ("student", "teacher"):
        for a, b in zip(
            jax.tree.leaves(getattr(got_state, model)), jax.tree.leaves(getattr(want_state, model)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # an lr step here is 2.5e-3
    assert step._cache_size() == 1  # compiled once


def test_teacher_starts_as_student_then_follows_by_ema(reference):
    """On the reference run (the sharded runs equal it, teacher included)."""
    (before, after, _), metrics, _ = reference
    for a, b in zip(jax.tree.leaves(before.student), jax.tree.leaves(before.teacher), strict=True):
        np.testing.assert_array_equal(a, b)
    m = float(metrics[0]["momentum"])
    assert m == pytest.approx(0.994)
    moved = 0
    for t0, t1, s1 in zip(*(jax.tree.leaves(x) for x in (before.teacher, after.teacher, after.student)), strict=True):
        np.testing.assert_allclose(t1, m * t0 + (1 - m) * s1, rtol=1e-6, atol=1e-7)
        moved += not np.array_equal(t1, t0)
    assert moved > 0 and int(after.step) == 1


def _multi_crop(images, rng, size, scale, n):
    """Random resized crops (area fraction in `scale`, aspect 3/4..4/3) with flips, ImageNet-normalised."""
    out = []
    for _ in range(n):
        img = images[rng.integers(len(images))]
        w, h = img.size
        area = rng.uniform(*scale) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, round(np.sqrt(area * aspect))), min(h, round(np.sqrt(area / aspect)))
        x0, y0 = rng.integers(w - cw + 1), rng.integers(h - ch + 1)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
        x = np.asarray(crop, np.float32) / 255.0
        x = x[:, ::-1] if rng.random() < 0.5 else x
        out.append(np.repeat(x[..., None], 3, -1))
    x = np.stack(out)
    return (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


def test_tiny_vit_learns_on_real_xrays_without_collapse():
    cfg = tiny_cpu.get_config()
    cfg.optim.update(base_lr=0.05, warmup_epochs=0, epochs=2, epoch_length=25)  # 50 steps
    state, step, spec = _setup(cfg, {"data": 8}, "data_parallel")
    paths = sorted((DATA / "kermany" / "images").glob("*.png")) + sorted((DATA / "images").glob("*.png"))
    images = [Image.open(pathlib.Path(p)).convert("L") for p in paths]
    rng = np.random.default_rng(0)
    g, b2 = spec["global_crops"].shape[:2]
    n_local = spec["local_crops"].shape[1]
    losses, entropies = [], []
    for _ in range(50):
        x_global = _multi_crop(images, rng, cfg.crops.global_crops_size, cfg.crops.global_crops_scale, g * b2)
        x_local = _multi_crop(images, rng, cfg.crops.local_crops_size, cfg.crops.local_crops_scale, g * n_local)
        batch = collate(
            x_global.reshape(spec["global_crops"].shape), x_local.reshape(spec["local_crops"].shape), rng, cfg
        )
        state, metrics = step(state, batch)
        losses.append(float(metrics["total_loss"]))
        entropies.append(float(metrics["teacher_batch_entropy"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses
    # Collapse would make every image's teacher distribution the same one-hot: the batch-mean
    # distribution's entropy would go to 0. With 256 prototypes and 32 images per step, the
    # mean distribution spreads over at least a few images' worth of prototypes: > log(4).
    assert min(entropies[-10:]) > np.log(4), entropies


def test_two_processes_equal_single_device(reference, tmp_path):
    """Two local processes x 4 CPU devices form one 8-device FSDP mesh via jax.distributed."""
    want_metrics = reference[1]
    port = portpicker.pick_unused_port()
    out = tmp_path / "metrics.json"
    worker = pathlib.Path(__file__).parent / "multihost_worker.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    run_processes([[sys.executable, str(worker), str(i), str(port), str(out), "fsdp=8", "fsdp"] for i in range(2)], env)
    got_metrics = json.loads(out.read_text())
    for got, want in zip(got_metrics, want_metrics, strict=True):
        for key in (
            "total_loss",
            "dino_local_crops_loss",
            "dino_global_crops_loss",
            "koleo_loss",
            "ibot_loss",
            "grad_norm",
            "update_norm",
        ):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)


def test_shared_head_option_traces_with_one_head():
    """ibot.separate_head=False: iBOT uses the DINO head (no ibot_head parameters)."""
    from chexfound_jax.data import batch_layout
    from chexfound_jax.models import abstract_params
    from chexfound_jax.ssl.schedules import Schedules
    from chexfound_jax.train import optimizer as optimizer_lib
    from chexfound_jax.train import recipe
    from chexfound_jax.train import state as state_lib
    from chexfound_jax.train import step as step_lib

    cfg = equivalence_config()
    cfg.ibot.separate_head = False
    model_cfg = recipe.model_config(cfg)
    assert model_cfg.ibot_head is None
    schedules = Schedules.from_config(recipe.schedule_config(cfg))
    optimizer = optimizer_lib.make_optimizer(abstract_params(model_cfg), schedules, cfg.optim)
    state = jax.eval_shape(lambda: state_lib.init_state(model_cfg, optimizer, 0))
    assert set(state.student) == {"backbone", "dino_head"}
    step = step_lib.make_train_step(cfg, model_cfg, optimizer, schedules)
    spec = batch_layout.batch_spec(cfg, cfg.train.batch_groups)
    new_state, metrics = jax.eval_shape(step, state, spec)
    assert metrics["ibot_loss"].shape == () and set(new_state.teacher) == {"backbone", "dino_head"}
