"""chexfound_jax/eval/knn.py and eval/online.py against brute-force NumPy, scikit-learn and hand values.

The online evaluation inside a pretraining run (logged, equal to an offline kNN on the exported teacher)
is tested with the job in tests/test_pretrain.py.
"""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from chexfound_jax.eval import knn, online


def brute_force_knn(train, labels, queries, k, temperature):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.full((len(queries), labels.shape[1]), np.nan)
    for i, q in enumerate(queries):
        sims = train @ q
        top = np.argsort(-sims, kind="stable")[:k]
        w = np.exp(sims[top] / temperature)
        w /= w.sum()
        for c in range(labels.shape[1]):
            known = ~np.isnan(labels[top, c])
            if known.any():
                out[i, c] = np.sum(w[known] * labels[top[known], c]) / np.sum(w[known])
    return out


def test_knn_matches_brute_force_with_unknown_labels_several_k_and_chunks():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 16)).astype(np.float32)
    labels = (rng.random((60, 3)) < 0.4).astype(np.float32)
    labels[rng.random((60, 3)) < 0.2] = np.nan  # unknown entries leave the class's mean
    labels[:, 2] = np.nan
    labels[0, 2] = 1.0  # class 2 known for one training image only
    queries = rng.normal(size=(25, 16)).astype(np.float32)
    got = knn.knn_scores(train, labels, queries, ks=(1, 5, 20), temperature=0.07, chunk=7)
    for k in (1, 5, 20):
        want = brute_force_knn(train, labels, queries, k, 0.07)
        np.testing.assert_allclose(got[k], want, rtol=2e-5, atol=1e-6)
        assert np.array_equal(np.isnan(got[k]), np.isnan(want))  # NaN: no neighbour knows the class


def test_knn_finds_the_matching_cluster():
    centres = np.eye(4, 32, dtype=np.float32) * 10
    rng = np.random.default_rng(1)
    train = np.repeat(centres, 10, axis=0) + rng.normal(size=(40, 32)).astype(np.float32)
    labels = np.repeat(np.eye(4, dtype=np.float32), 10, axis=0)
    queries = centres + rng.normal(size=(4, 32)).astype(np.float32)
    scores = knn.knn_scores(train, labels, queries, ks=(5,))[5]
    assert np.array_equal(scores.argmax(1), np.arange(4)) and np.all(scores.max(1) > 0.99)


def test_knn_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="must be"):
        knn.knn_scores(np.zeros((5, 4)), np.zeros((4, 1)), np.zeros((2, 4)))


@pytest.mark.parametrize("n", [40, 12])  # more rows than dimensions (primal), fewer (dual)
def test_ridge_probe_equals_scikit_learn(n):
    rng = np.random.default_rng(2)
    d = 20
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = (x[:, :2] @ rng.normal(size=(2, 2)) > 0).astype(np.float64)
    y[3, 1] = np.nan
    q = rng.normal(size=(9, d))
    got = online.ridge_probe_scores(x, y, q, alpha=0.5)
    mean, std = x.mean(0), x.std(0) + 1e-6
    for c in range(2):
        known = ~np.isnan(y[:, c])
        ridge = Ridge(alpha=0.5 * known.sum()).fit((x[known] - mean) / std, y[known, c])
        np.testing.assert_allclose(got[:, c], ridge.predict((q - mean) / std), rtol=1e-8, atol=1e-10)


def test_collapse_monitors_on_collapsed_and_isotropic_features():
    collapsed = np.tile(np.random.default_rng(3).normal(size=(1, 64)), (200, 1))
    m = online.collapse_monitors(collapsed)
    assert m["feature_std"] < 1e-6 and m["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    isotropic = np.random.default_rng(4).normal(size=(4000, 64))
    m = online.collapse_monitors(isotropic)
    assert m["feature_std"] == pytest.approx(1 / 8, rel=0.05)  # 1 / sqrt(D)
    assert 60 < m["effective_rank"] <= 64


def test_macro_scores_by_hand():
    labels = np.array([[1, 0], [0, np.nan], [1, 1], [0, 1]], np.float64)
    scores = np.array([[0.9, 0.2], [0.6, 0.9], [0.4, 0.7], [0.1, 0.4]], np.float64)
    # class 0: positives 0.9, 0.4 vs negatives 0.6, 0.1 -> 3 of 4 pairs ordered: 0.75; > 0.5 right for 0.9, 0.1: 2/4
    # class 1 (row 1 unknown): positives 0.7, 0.4 vs negative 0.2 -> 1.0; right for 0.2, 0.7: 2/3
    got = online.macro_scores(labels, scores)
    assert got["auroc"] == pytest.approx((0.75 + 1.0) / 2)
    assert got["accuracy"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert np.isnan(online.macro_scores(np.ones((3, 1)), np.ones((3, 1)))["auroc"])  # one label only: no AUROC
