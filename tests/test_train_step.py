"""The sharded student/EMA-teacher train step on 8 simulated CPU devices."""

import pathlib

import jax
import numpy as np
import pytest
from helpers import DATA
from PIL import Image

from chexfound_jax.data.collate import collate
from chexfound_jax.models import abstract_params
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.parallel import sharding
from chexfound_jax.ssl.schedules import Schedules
from chexfound_jax.train import optimizer as optimizer_lib
from chexfound_jax.train import recipe
from chexfound_jax.train import state as state_lib
from chexfound_jax.train import step as step_lib
from configs.pretrain import tiny_cpu


def _setup(cfg, mesh_axes, rules, devices=None):
    model_cfg = recipe.model_config(cfg)
    schedules = Schedules.from_config(recipe.schedule_config(cfg))
    optimizer = optimizer_lib.make_optimizer(abstract_params(model_cfg), schedules, cfg.optim)
    mesh = mesh_lib.create_mesh(mesh_axes, devices)
    rules = sharding.resolve_rules(rules)
    state, shardings = state_lib.create_state(model_cfg, optimizer, rules, mesh, seed=cfg.train.seed)
    spec = recipe.batch_spec(cfg, cfg.train.batch_groups)
    batch_shardings = sharding.tree_shardings(recipe.batch_logical_axes(spec), spec, rules, mesh)
    step = step_lib.make_train_step(cfg, model_cfg, optimizer, schedules)
    return state, step_lib.compile_train_step(step, shardings, batch_shardings, mesh), spec


def _random_batches(cfg, spec, n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        collate(
            rng.standard_normal(spec["global_crops"].shape, np.float32),
            rng.standard_normal(spec["local_crops"].shape, np.float32),
            rng,
            cfg,
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def cfg():
    c = tiny_cpu.get_config()
    c.optim.update(base_lr=0.02, warmup_epochs=0)  # visible updates in two steps
    c.model.drop_path_rate = 0.0  # the subset draw depends on the rng, not on the mesh, but keep it simple
    # Adam's first steps divide each gradient by its own magnitude: with eps 1e-8 a gradient of ~1e-9
    # whose rounding differs between reduction orders moves its parameter by a different fraction of
    # the lr. A larger eps keeps the comparison about the step, not about that amplification.
    c.optim.adamw_eps = 1e-4
    return c


@pytest.fixture(scope="module")
def reference(cfg):
    """Two steps on one device: the truth the sharded runs must reproduce."""
    state, step, spec = _setup(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])
    batches = _random_batches(cfg, spec, 2)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, batches


@pytest.mark.parametrize(
    "mesh_axes,rules",
    [({"data": 8}, "data_parallel"), ({"fsdp": 8}, "fsdp"), ({"data": 4, "fsdp": 2}, "fsdp")],
    ids=["dp8", "fsdp8", "dp4xfsdp2"],
)
def test_sharded_step_equals_single_device(cfg, reference, mesh_axes, rules):
    want_state, want_metrics, batches = reference
    state, step, _ = _setup(cfg, mesh_axes, rules)
    if rules == "fsdp":
        kernel = state.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
        assert "fsdp" in kernel.sharding.spec  # parameters really are split
    for batch, want in zip(batches, want_metrics):
        state, got = step(state, batch)
        for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
        for key in ("grad_norm/backbone", "grad_norm/dino_head", "grad_norm/ibot_head", "update_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
    got_state = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(got_state.student), jax.tree.leaves(want_state.student)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # an lr step here is 2.5e-3
    assert step._cache_size() == 1  # compiled once


def test_teacher_starts_as_student_then_follows_by_ema(cfg):
    state, step, spec = _setup(cfg, {"data": 8}, "data_parallel")
    before = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(before.student), jax.tree.leaves(before.teacher)):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, _random_batches(cfg, spec, 1)[0])
    after = jax.device_get(state)
    m = float(metrics["momentum"])
    assert m == pytest.approx(0.994)
    moved = 0
    for t0, t1, s1 in zip(*(jax.tree.leaves(x) for x in (before.teacher, after.teacher, after.student))):
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
