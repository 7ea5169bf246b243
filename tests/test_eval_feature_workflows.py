"""kNN and logistic regression on frozen features: against NumPy and scikit-learn, sharded, and end to end.

The kNN scores are checked against a brute-force NumPy vote (cosine similarity, softmax(sim / T) over the k
nearest, per class with unknown labels left out), the row-sharded search on the 8 simulated devices against
the single-device one, and the logistic-regression sweep against scikit-learn fitting the same objective.
Both workflows then run through `chexfound_jax.evaluate` on a tiny synthetic task with the golden tiny backbone.
"""

import json
import os

import jax
import numpy as np
import pytest
import synthetic
from helpers import TINY_HEADS, TINY_TEACHER
from ml_collections import ConfigDict
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from chexfound_jax import evaluate
from chexfound_jax.eval import embeddings, feature_workflows, knn
from configs.eval import knn_cxrlt, logreg_cxrlt, tiny_cpu


def _data(n_train=203, n_query=37, dim=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(n_train, dim)).astype(np.float32)
    labels = (rng.random((n_train, classes)) < 0.3).astype(np.float32)
    labels[rng.random(labels.shape) < 0.15] = np.nan  # unknown labels
    return train, labels, rng.normal(size=(n_query, dim)).astype(np.float32)


def _numpy_knn(train, labels, queries, k, temperature):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(queries.astype(np.float64)) @ unit(train.astype(np.float64)).T
    out = np.full((len(queries), labels.shape[1]), np.nan)
    for q in range(len(queries)):
        top = np.argsort(-sims[q], kind="stable")[:k]
        w = np.exp(sims[q, top] / temperature)
        w /= w.sum()
        for c in range(labels.shape[1]):
            known = ~np.isnan(labels[top, c])
            if known.any():
                out[q, c] = np.sum(w[known] * labels[top, c][known]) / np.sum(w[known])
    return out


def test_knn_scores_match_a_numpy_vote_for_every_k():
    train, labels, queries = _data()
    ks = (1, 5, 20, 500)  # 500 > 203 rows: every training image votes
    got = knn.knn_scores(train, labels, queries, ks, temperature=0.07, chunk=16)
    for k in ks:
        want = _numpy_knn(train, labels, queries, min(k, len(train)), 0.07)
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(want))
        np.testing.assert_allclose(got[k], want, rtol=0, atol=2e-5, equal_nan=True)
    assert np.isnan(got[1]).any()  # a class its single neighbour does not know


def test_row_sharded_knn_equals_the_single_device_search():
    assert jax.device_count() == 8
    train, labels, queries = _data(n_train=203)  # 203 rows: 5 padding rows over 8 devices
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ks = (1, 10, 30)  # 30 > the 26 rows a device holds
    single = knn.knn_scores(train, labels, queries, ks, chunk=16)
    sharded = knn.knn_scores(train, labels, queries, ks, chunk=16, mesh=mesh)
    for k in ks:
        np.testing.assert_allclose(sharded[k], single[k], rtol=0, atol=1e-6, equal_nan=True)


def _sklearn_logits(x, y, queries, c):
    known = ~np.isnan(y)
    model = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(x[known], y[known])
    return model.decision_function(queries)


@pytest.mark.parametrize("solver", feature_workflows.SOLVERS)
def test_logreg_selects_the_c_a_scikit_learn_sweep_selects_and_tests_alike(solver):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 3))
    x = rng.normal(size=(300, 12))
    y = (x @ w + 2.0 * rng.normal(size=(300, 3)) > 0.5).astype(np.float64)
    y[rng.random(y.shape) < 0.1] = np.nan
    train, val, test = (slice(0, 150), slice(150, 220), slice(220, 300))
    cs = tuple(np.logspace(-4, 2, 9))
    names = ("a", "b", "c")
    options = {"solver": solver, "max_iter": 1000 if solver == "lbfgs" else 100}
    best, scores = feature_workflows.logreg_select((x[train], y[train]), (x[val], y[val]), cs, names, **options)

    def macro(queries_rows, fit_rows, c):
        aucs = []
        for k in range(3):
            yq = y[queries_rows, k]
            known = ~np.isnan(yq)
            logits = _sklearn_logits(x[fit_rows], y[fit_rows, k], x[queries_rows], c)
            aucs.append(roc_auc_score(yq[known], logits[known]))
        return np.mean(aucs)

    want = [macro(val, train, c) for c in cs]
    assert best == int(np.argmax(want)) and len(set(np.round(want, 6))) > 3  # the grid matters
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-9)
    refit = slice(0, 220)  # train + val
    logits = feature_workflows.logreg_path(x[refit], y[refit], x[test], (cs[best],), **options)[0]
    ours = [roc_auc_score(y[test, k][~np.isnan(y[test, k])], logits[~np.isnan(y[test, k]), k]) for k in range(3)]
    assert np.mean(ours) == pytest.approx(macro(test, refit, cs[best]), abs=1e-9)


# --- end to end ------------------------------------------------------------------------------------------

COUNTS = {"train": 32, "val": 16, "test": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_eval_data")
    return synthetic.build_shards(synthetic.write_release(root / "release", COUNTS), root / "out", name="synthetic")


def _config(shards, workflow, **section):
    c = tiny_cpu.get_config()
    c.workflow = workflow
    c.data.datasets = (os.fspath(shards),)
    c.task = synthetic.task_config()
    c.backbone.num_heads = TINY_HEADS
    c.report.plots = False  # the report files without curves (tests/test_eval_reports.py draws them)
    c.metrics.n_bootstrap = 20
    if workflow == "knn":
        c.knn = knn_cxrlt.knn_section()
    else:
        c.logreg = logreg_cxrlt.logreg_section()
    c[workflow].update(section)
    return c


@pytest.mark.torch
def test_knn_workflow_end_to_end_and_its_feature_cache(shards, tmp_path, monkeypatch):
    cfg = _config(shards, "knn", ks=(1, 5, 10))
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert results["workflow"] == "knn" and results["k"] in (1, 5, 10) and results["bank"] == "train + val"
    assert results["splits"] == COUNTS and set(results["per_k"]) == {"1", "5", "10"}
    assert 0.0 <= results["macro"]["auroc"] <= 1.0 and results["macro"]["auroc_ci"] is not None
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["best_k"] == results["k"] and len(selection["val"]) == 3
    saved = json.loads((tmp_path / "test" / "results.json").read_text())
    assert saved["macro"]["auroc"] == pytest.approx(results["macro"]["auroc"])
    assert (tmp_path / "test" / "report.md").exists() and (tmp_path / "test" / "predictions.csv").exists()
    for split, n in COUNTS.items():
        with np.load(tmp_path / "features" / f"{split}.npz") as z:
            assert z["features"].shape == (n, 64) and np.isfinite(z["features"]).all()

    # A rerun reads the cached features: embedding again would fail.
    def refuse(*_):
        raise AssertionError("embedded again")

    monkeypatch.setattr(embeddings, "class_tokens", refuse)
    again = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert again["macro"] == results["macro"]


@pytest.mark.torch
def test_logreg_workflow_end_to_end(shards, tmp_path):
    cfg = _config(shards, "logreg", cs=(1e-3, 1e-1, 10.0))
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert results["workflow"] == "logreg" and results["c"] in (1e-3, 1e-1, 10.0)
    assert results["fit"] == "train + val" and results["splits"] == COUNTS
    assert 0.0 <= results["macro"]["auroc"] <= 1.0
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["best_c"] == results["c"] and len(selection["val"]) == 3
    rows = (tmp_path / "test" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "image_id,marker_a,marker_b" and len(rows) == COUNTS["test"] + 1
    assert all(0.0 <= float(v) <= 1.0 for row in rows[1:] for v in row.split(",")[1:])


def test_a_config_without_the_section_is_refused():
    env = type("Env", (), {"cfg": ConfigDict({"workflow": "knn"})})()
    with pytest.raises(ValueError, match="knn_cxrlt.py"):
        feature_workflows.run_knn(env, "/nonexistent")
