"""chexfound_jax/experiments/head_probe.py: heads trained on stored features are the heads trained on images,
and the grouped-CV GLoRI probe learns a task its features carry and not one they do not."""

import jax
import numpy as np
import pytest

from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization
from chexfound_jax.experiments import head_probe
from chexfound_jax.train import recipe
from chexfound_jax.train.state import init_params
from configs.pretrain import tiny_cpu

PROBE = head_probe.HeadProbe(
    lrs=(1e-3, 1e-2), epochs=10, batch_size=16, n_last_blocks=2, decoder_dim=16, num_heads=2, ffn_dim=32, folds=3
)


def test_stored_features_train_the_same_heads_as_images():
    model_cfg = recipe.model_config(tiny_cpu.get_config())
    vit, params = model_cfg.backbone, init_params(model_cfg, jax.random.key(0))["backbone"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = (rng.random((8, 1)) < 0.5).astype(np.float32)
    feats = head_probe.head_features(vit, params, images, PROBE.n_last_blocks, batch=3)  # batches of 3, 3, 2

    frozen = FrozenFeatures(vit, params, PROBE.n_last_blocks)
    on_stored = head_probe._bank(PROBE, vit.embed_dim)
    on_images = HeadBank(PROBE.head(vit.embed_dim), Optimization(PROBE.lrs), frozen, on_stored.mesh)
    a, b = on_images.init(0, 5), on_stored.init(0, 5)
    for _ in range(3):
        a, _ = on_images.train_step(a, frozen.state, {"image": images, "labels": labels}, jax.random.key(1))
        b, _ = on_stored.train_step(b, {}, {"image": feats, "labels": labels}, jax.random.key(1))
    want = np.asarray(on_images.predict(a["params"], a["rest"], frozen.state, images))[..., 0]
    np.testing.assert_allclose(head_probe.scores(on_stored, b, feats), want, rtol=1e-4, atol=1e-6)


def _features(n: int, signal: np.ndarray, seed: int) -> dict:
    """Head inputs of width 2 x 8 whose patch tokens carry `signal` in channel 3 of half the patches."""
    rng = np.random.default_rng(seed)
    patch = rng.standard_normal((n, 9, 16)).astype(np.float32)
    patch[:, :5, 3] += 3.0 * signal[:, None]
    return {"cls": rng.standard_normal((n, 16)).astype(np.float32), "patch": patch, "avgpool": patch[..., 8:].mean(1)}


@pytest.mark.parametrize("learnable", [True, False])
def test_glori_probe_learns_what_the_patches_carry(learnable):
    rng = np.random.default_rng(3)
    y, y_test = rng.integers(0, 2, 96).astype(np.float32), rng.integers(0, 2, 40).astype(np.float32)
    carried = (y, y_test) if learnable else (rng.integers(0, 2, 96), rng.integers(0, 2, 40))  # labels not in features
    train = (_features(96, carried[0].astype(np.float32), 0), y, np.arange(96) // 2)  # two images per patient
    test = (_features(40, carried[1].astype(np.float32), 1), y_test)
    result = head_probe.glori_probe(train, test, PROBE, n_bootstrap=100, bootstrap_seed=0)
    assert result["lr"] in PROBE.lrs and len(result["scores"]) == 40
    if learnable:
        assert result["test_auroc"] > 0.95 and result["cv_auroc"] > 0.9
    else:
        assert 0.25 < result["test_auroc"] < 0.75
