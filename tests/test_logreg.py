"""chexfound_jax/eval/logreg.py against scikit-learn, grouped folds, and the paired bootstrap difference."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from chexfound_jax.eval import logreg, metrics


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_fit_equals_scikit_learn(c, standardize):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 12)) * rng.uniform(0.2, 5, size=12) + rng.normal(size=12)
    y = (x[:, 0] - 0.5 * x[:, 3] + rng.normal(size=150) > 0).astype(float)
    q = rng.normal(size=(20, 12))
    model = logreg.fit(x, y, c, standardize=standardize)
    scale = StandardScaler().fit(x).transform if standardize else (lambda a: a)
    ref = LogisticRegression(C=c, tol=1e-12, max_iter=10000).fit(scale(x), y)
    # scikit-learn's solver stops about 1e-6 short of the optimum; Newton is at it: same model, lower objective.
    np.testing.assert_allclose(model.w, ref.coef_[0], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(model.predict_proba(q), ref.predict_proba(scale(q))[:, 1], rtol=2e-5)
    z = scale(x)

    def objective(w, b):
        margin = z @ w + b
        return 0.5 * w @ w + c * np.sum(np.logaddexp(0, margin) - y * margin)

    assert objective(model.w, model.b) <= objective(ref.coef_[0], ref.intercept_[0]) + 1e-9


@pytest.mark.parametrize("standardize", [False, True])
def test_jax_lbfgs_fits_every_class_at_once_to_scikit_learns_minimiser(standardize):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10)) * rng.uniform(0.2, 5, size=10) + rng.normal(size=10)
    y = np.stack([(x @ rng.normal(size=10) + rng.normal(size=200) > 0).astype(float) for _ in range(3)], axis=1)
    y[rng.random(200) < 0.2, 1] = np.nan  # unknown labels leave their class's loss only
    y[:, 2] = 1.0  # one label value: left out, the other classes' fits unchanged
    q = rng.normal(size=(15, 10))
    cs = (10.0, 1e-3, 0.1)  # fitted in increasing order, each from the previous minimiser
    got = logreg.lbfgs_path(x, y, q, cs, standardize=standardize)
    scale = StandardScaler().fit(x).transform if standardize else (lambda a: a)
    for i, c in enumerate(cs):
        for k in range(2):
            known = ~np.isnan(y[:, k])
            ref = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12, max_iter=1000)
            want = ref.fit(scale(x[known]), y[known, k]).decision_function(scale(q))
            np.testing.assert_allclose(got[i, :, k], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[:, :, 2], 0.0)
    alone = logreg.lbfgs_path(x, y[:, :2], q, cs, standardize=standardize)
    np.testing.assert_allclose(got[:, :, :2], alone, rtol=1e-9, atol=1e-10)


def test_fit_rejects_one_class():
    with pytest.raises(ValueError, match="labels 0 and 1"):
        logreg.fit(np.zeros((4, 2)), np.ones(4), 1.0)


def test_grouped_folds_keep_patients_together_and_balance_rows():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 90, size=300)
    folds = logreg.grouped_folds(groups, 5, seed=3)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= np.bincount(groups).max()
    assert np.array_equal(folds, logreg.grouped_folds(groups, 5, seed=3))  # seeded
    with pytest.raises(ValueError, match="groups cannot fill"):
        logreg.grouped_folds([1, 1, 2], 5, seed=0)


def test_select_c_prefers_the_penalty_that_generalises():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 60))
    y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(float)  # one informative dimension of 60
    folds = logreg.grouped_folds(np.arange(120), 5, seed=0)
    best, cv = logreg.select_c(x, y, folds, [1e-3, 1e-1, 1e3])
    # Each C's score is the mean over the 5 folds of the held-out AUROC of the model fitted on the other 4:
    # the same with scikit-learn's model and AUROC (its solver stops ~1e-6 short: the ranks do not change).
    want = [
        np.mean(
            [
                roc_auc_score(
                    y[folds == f],
                    LogisticRegression(C=c, tol=1e-12, max_iter=10000)
                    .fit(x[folds != f], y[folds != f])
                    .decision_function(x[folds == f]),
                )
                for f in range(5)
            ]
        )
        for c in (1e-3, 1e-1, 1e3)
    ]
    np.testing.assert_allclose(cv, want, rtol=0, atol=1e-12)
    assert best == 1e-1 and cv[1] > cv[2]  # the weakest penalty overfits the 59 noise dimensions


def test_paired_difference_by_construction():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=200).astype(float)
    good = y + rng.normal(size=200)
    noisy = y + 3 * rng.normal(size=200)
    same = metrics.paired_auroc_difference(y, good, good, n_bootstrap=200)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    d = metrics.paired_auroc_difference(y, good, noisy, n_bootstrap=500, seed=1)
    assert d["difference"] == pytest.approx(metrics.auroc(y, good) - metrics.auroc(y, noisy))
    assert 0 < d["ci"][0] < d["difference"] < d["ci"][1]
