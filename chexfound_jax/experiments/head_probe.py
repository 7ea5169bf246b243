"""GLoRI on frozen features computed once, the learning rate chosen by patient-grouped cross-validation.

The official protocol (eval/classification/linear_glori.py) trains one head per learning rate of its
13-value grid at once (AdamW, weight decay 1e-4, cosine decay to 0 over 100 epochs, no warm-up), picks
the lr on a validation split and refits the winner on train + val. This is that protocol for a set too
small to spare a validation split, on 2 CPU cores: the backbone runs once per image (eval transform,
no train augmentation, as the linear probe) and the project's `HeadBank` trains every lr on the stored
features; the lr is the best mean AUROC over k folds of the pool (patients kept together), then the
bank is retrained on the whole pool and the chosen head scores the test set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from chexfound_jax.eval import logreg, metrics
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization, select_best
from chexfound_jax.models.classifiers import ClassifierConfig
from chexfound_jax.models.vit import ViTConfig

OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclasses.dataclass(frozen=True)
class HeadProbe:
    """The head and its training; defaults are the official GLoRI recipe (--glori --cat-cls)."""

    lrs: tuple[float, ...] = OFFICIAL_LRS
    epochs: int = 100
    batch_size: int = 64  # capped at the training-set size, as the official loader
    weight_decay: float = 1e-4
    n_last_blocks: int = 4
    decoder_dim: int = 768
    num_heads: int = 8
    ffn_dim: int = 2048
    folds: int = 5
    seed: int = 0

    def head(self, embed_dim: int) -> ClassifierConfig:
        return ClassifierConfig(
            kind="glori", num_classes=1, embed_dim=embed_dim, n_blocks=self.n_last_blocks,
            decoder_dim=self.decoder_dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim, cat_cls=True,
        )  # fmt: skip


class _Stored:
    """Stands in for FrozenFeatures in a HeadBank whose batches already hold the head inputs."""

    def __call__(self, state: Any, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
        del state
        return features


def head_features(vit_cfg: ViTConfig, backbone: dict, images: np.ndarray, n_blocks: int, batch: int) -> dict:
    """The heads' inputs ("cls", "patch", "avgpool") of every image, as float32 numpy arrays."""
    frozen = FrozenFeatures(vit_cfg, backbone, n_blocks)
    run = jax.jit(frozen.__call__)
    parts = [jax.device_get(run(frozen.state, images[i : i + batch])) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(features: dict, rows: np.ndarray) -> dict:
    return {k: v[rows] for k, v in features.items()}


def _bank(probe: HeadProbe, embed_dim: int) -> HeadBank:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    opt = Optimization(tuple(probe.lrs), probe.weight_decay)
    return HeadBank(probe.head(embed_dim), opt, _Stored(), mesh)  # type: ignore[arg-type]


def train(bank: HeadBank, features: dict, labels: np.ndarray, probe: HeadProbe) -> dict:
    """Every lr's head trained for `epochs` over (features, labels): the official infinite shuffled
    sampler (a fresh permutation per epoch, batches running across epoch boundaries)."""
    n = len(labels)
    batch = min(probe.batch_size, n)
    steps = probe.epochs * math.ceil(n / batch)
    rng = np.random.default_rng(probe.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n))])
    state = bank.init(probe.seed, steps)
    y = np.asarray(labels, np.float32).reshape(n, 1)
    key = jax.random.key(probe.seed)
    for s in range(steps):
        rows = order[s * batch : (s + 1) * batch]
        state, _ = bank.train_step(state, {}, {"image": _take(features, rows), "labels": y[rows]}, key)
    return state


@jax.jit
def _probabilities(graphdef: Any, params: Any, rest: Any, features: dict) -> jax.Array:
    logits = jax.vmap(lambda p, r: nnx.merge(graphdef, p, r)(features))(params, rest)
    return jax.nn.sigmoid(logits[..., 0])


def scores(bank: HeadBank, state: dict, features: dict) -> np.ndarray:
    """(heads, N) positive-class probabilities, in eval mode (no dropout)."""
    return np.asarray(_probabilities(bank.graphdef, state["params"], state["rest"], features))


def glori_probe(
    train_set: tuple[dict, np.ndarray, np.ndarray],
    test_set: tuple[dict, np.ndarray],
    probe: HeadProbe,
    *,
    n_bootstrap: int,
    bootstrap_seed: int,
) -> dict[str, Any]:
    """lr by grouped CV inside (features, labels, patients), the bank refitted on all of it, test AUROC
    of the chosen head with its bootstrap CI (same keys as the linear probe's result)."""
    feats, y, patients = train_set
    embed_dim = feats["cls"].shape[1] // probe.n_last_blocks
    bank = _bank(probe, embed_dim)
    folds = logreg.grouped_folds(patients, probe.folds, probe.seed)
    cv = []
    for f in range(probe.folds):
        fit_rows, held = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        state = train(bank, _take(feats, fit_rows), y[fit_rows], probe)
        held_scores = scores(bank, state, _take(feats, held))
        cv.append([metrics.auroc(y[held], s) for s in held_scores])
    mean_cv = np.nanmean(np.asarray(cv, np.float64), axis=0)
    best = select_best(mean_cv.tolist())
    state = train(bank, feats, y, probe)
    test_scores = scores(bank, state, test_set[0])[best]
    result = metrics.binary_metrics(test_set[1], test_scores, n_bootstrap=n_bootstrap, seed=bootstrap_seed)
    auc = result["macro"]
    return {"lr": probe.lrs[best], "cv_auroc": float(mean_cv[best]), "test_auroc": auc["auroc"],
            "test_auroc_ci": auc["auroc_ci"], "scores": test_scores.tolist()}  # fmt: skip
