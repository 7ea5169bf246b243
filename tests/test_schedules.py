"""Training schedules against the official numpy CosineScheduler values (golden schedules.npz)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import golden

from chexfound_jax.ssl.schedules import Schedules, cosine_schedule, scaled_lr

NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")
EPOCH = 2500


@pytest.fixture(scope="module")
def gold() -> dict:
    return golden("schedules")


@pytest.fixture(scope="module")
def config(gold) -> dict:
    return json.loads(str(gold["config"]))


def official_cosine(base, final, total_iters, warmup_iters=0, start_warmup_value=0.0, freeze_iters=0):
    """DINOv2's CosineScheduler (dinov2/utils/utils.py), verbatim semantics."""
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((freeze, warmup, cosine))
    return lambda it: schedule[it] if it < total_iters else final


@pytest.mark.parametrize(
    "args",
    [
        (1.0, 0.1, 20, 5, 0.3, 3),  # freeze, warmup from non-zero, cosine
        (0.04, 0.2, 17),  # rising, no warmup
        (0.07, 0.07, 9, 9, 0.04),  # warmup only (the teacher temperature's shape)
        (2.0, -1.0, 6, 1, 0.5, 0),  # one-point warmup is start_warmup
    ],
)
@pytest.mark.parametrize("xp, rtol", [(np, 1e-12), (jnp, 1e-6)])
def test_cosine_matches_official_array(args, xp, rtol):
    ref = official_cosine(*args)
    steps = np.arange(args[2] + 4)
    got = np.asarray(cosine_schedule(*args, xp=xp)(steps), np.float64)
    np.testing.assert_allclose(got, [ref(int(s)) for s in steps], rtol=rtol, atol=1e-7 if xp is jnp else 0)


@pytest.mark.parametrize("xp, rtol", [(np, 1e-12), (jnp, 1e-6)])
@pytest.mark.parametrize("steps", ["iterations", "grid_iterations"])
def test_golden_schedules(gold, config, xp, rtol, steps):
    schedules = Schedules.from_config(config, xp=xp)
    prefix = "" if steps == "iterations" else "grid_"
    for name in NAMES:
        fn = getattr(schedules, name)
        got = fn(gold[steps]) if xp is np else jax.jit(fn)(jnp.asarray(gold[steps], jnp.int32))
        assert got.dtype == (np.float64 if xp is np else jnp.float32)
        np.testing.assert_allclose(np.asarray(got, np.float64), gold[prefix + name], rtol=rtol, atol=0, err_msg=name)


def test_golden_probe_points(gold):
    np.testing.assert_array_equal(gold["iterations"], [0, 1, 2499, 2500, 24999, 25000, 75000, 124999, 249999])
    assert gold["grid_iterations"][-1] == 250000  # past the end: final values


@pytest.mark.parametrize("xp", [np, jnp])
def test_scalar_steps_and_past_the_end(config, xp):
    s = Schedules.from_config(config, xp=xp)
    values = s(250_000)
    assert float(values["lr"]) == pytest.approx(1e-6, rel=1e-7)
    assert float(values["wd"]) == pytest.approx(0.2, rel=1e-7)
    assert float(values["momentum"]) == 1.0
    assert float(values["teacher_temp"]) == pytest.approx(0.07, rel=1e-7)
    assert float(s.teacher_temp(75_000 - 1)) == pytest.approx(0.07, rel=1e-7)  # linspace is inclusive
    assert s.total_iters == 250_000


@pytest.mark.parametrize("xp", [np, jnp])
def test_last_layer_frozen_for_one_epoch(config, xp):
    s = Schedules.from_config(config, xp=xp)
    steps = np.arange(EPOCH + 1)
    frozen, lr = np.asarray(s.last_layer_lr(steps)), np.asarray(s.lr(steps))
    assert np.all(frozen[:EPOCH] == 0.0)
    assert frozen[EPOCH] == lr[EPOCH] > 0
    assert np.all(lr[1:EPOCH] > 0)


def test_sqrt_scaling(config):
    assert scaled_lr(2e-4, 80) == 5.590169943749475e-05 == config["peak_lr"]
    assert scaled_lr(2e-4, 1024) == 2e-4
    assert scaled_lr(2e-4, 8 * 14) == pytest.approx(6.61e-5, rel=1e-3)  # official utils/config.py sqrt rule, stage 448


def test_config_names(config):
    """Our names (global_batch_size, epoch_length) and a ConfigDict give the official schedules."""
    ours = {k: v for k, v in config.items() if k not in ("batch_size_per_gpu", "world_size", "OFFICIAL_EPOCH_LENGTH")}
    ours.update(global_batch_size=80, epoch_length=EPOCH)
    steps = np.array([0, 1, 2499, 2500, 30_000, 249_999, 260_000])
    ref = Schedules.from_config(config, xp=np)
    for cfg in (ours, ml_collections.ConfigDict(ours)):
        got = Schedules.from_config(cfg, xp=np)
        for name in NAMES:
            np.testing.assert_array_equal(getattr(got, name)(steps), getattr(ref, name)(steps))
    with pytest.raises(KeyError, match="base_lr"):
        Schedules.from_config({k: v for k, v in ours.items() if k != "base_lr"})


@pytest.mark.parametrize(
    "name, batch, peak_lr",
    [
        ("vitl16_224", 304, 1.09e-4),  # 8 GPUs x 38
        ("vitl16_448", 112, 6.61e-5),  # 8 x 14
        ("vitl16_512", 80, 5.59e-5),  # the yaml's 8 x 10
        ("vitl16_512_b112", 112, 6.61e-5),  # the released run's log: 8 x 14
    ],
)
def test_stage_configs_give_the_official_batch_and_lr(name, batch, peak_lr):
    import importlib

    cfg = importlib.import_module(f"configs.pretrain.{name}").get_config()
    assert cfg.train.global_batch_size == batch and cfg.train.batch_groups == 8  # one group per official GPU
    assert scaled_lr(cfg.optim.base_lr, batch) == pytest.approx(peak_lr, rel=3e-3)
