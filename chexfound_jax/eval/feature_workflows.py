"""kNN and logistic-regression evaluation on frozen class tokens (DINOv2's eval/knn.py, eval/log_regression.py).

Both embed each split once (`embeddings.split_features`, cached in the workdir), choose their
hyperparameter on the validation split by the probes' selection metric (macro AUROC or AP,
`eval.selection_metric`), and report the test split as the probes do (results.json, report.md, curves,
predictions.csv under workdir/test; the selection under workdir/selection.json).

  knn     weighted vote softmax(cosine / T) of the k nearest training images, per class, for every k of
          `knn.ks` at once; the best k on val; the test queries search train (+ val with refit.enabled)
  logreg  one L2 logistic regression per class (scikit-learn's objective; `logreg.solver`: scikit-learn's
          L-BFGS, eval/logreg.py's Newton, or its JAX L-BFGS over all classes at once) for every C of
          `logreg.cs` on train, warm-started along the C path; the best C on val; refit on train + val
          (refit.enabled, as the official final model), test
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from chexfound_jax.eval import embeddings, knn, logreg, metrics, reports, workflows
from chexfound_jax.eval.probe import select_best


def macro_score(labels: np.ndarray, scores: np.ndarray, names: Sequence[str], key: str) -> float:
    """The selection metric: macro AUROC or AP over the classes both labels of which are present."""
    if key not in ("auroc", "ap"):
        raise ValueError(f"eval.selection_metric must be 'auroc' or 'ap', got {key!r}")
    return metrics.classification_metrics(labels, scores, names, n_bootstrap=0)["macro"][key]


def fill_unscored(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores with NaN (a class none of a query's neighbours knows) replaced by the class's known prevalence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class without a known label: prevalence 0
        prevalence = np.nan_to_num(np.nanmean(labels, axis=0), nan=0.0)
    return np.where(np.isnan(scores), prevalence[None, :], scores).astype(np.float32)


# --- logistic regression --------------------------------------------------------------------------------


SOLVERS = ("newton", "lbfgs", "jax")


def _class_path(x, y, queries, cs, order, *, solver, max_iter, standardize) -> np.ndarray:
    """(len(cs), Q) logits of one class's models, fitted along `order` (increasing C), each warm-started."""
    out = np.empty((len(cs), len(queries)), np.float64)
    if solver == "newton":
        model = None
        for i in order:
            model = logreg.fit(x, y, float(cs[i]), standardize=standardize, max_iter=max_iter, init=model)
            out[i] = model.decision(queries)
        return out
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if standardize:
        mean, std = x.mean(0), x.std(0) + 1e-12
        x, queries = (x - mean) / std, (queries - mean) / std
    est = LogisticRegression(solver="lbfgs", tol=1e-12, max_iter=max_iter, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 1e-12 is rarely met: max_iter ends the fit
        for i in order:
            out[i] = est.set_params(C=float(cs[i])).fit(x, y).decision_function(queries)
    return out


def logreg_path(
    x: np.ndarray,
    y: np.ndarray,
    queries: np.ndarray,
    cs: Sequence[float],
    *,
    solver: str = "newton",
    max_iter: int = 100,
    standardize: bool = False,
) -> np.ndarray:
    """(len(cs), Q, C) decision values (logits) of one logistic regression per class and C, in float64.

    `solver`: "newton" (eval/logreg.py; `max_iter` Newton steps), "lbfgs" (scikit-learn's, with the official
    tol=1e-12; `max_iter` iterations, official 1000) or "jax" (logreg.lbfgs_path: optax's L-BFGS on every class
    at once, for accelerators), the same objective. Logits rather than probabilities:
    ranks are what AUROC and AP read, and a sigmoid in floating point ties every margin above ~37 at 1.
    Each class is fitted on the rows whose label is known, C in increasing order, each fit starting from
    the previous one's minimiser. A class with one label value among them scores a constant logit of +-30,
    its probability that value to 1e-13 (0 for a class with no known label).
    """
    if solver not in SOLVERS:
        raise ValueError(f"logreg.solver must be one of {SOLVERS}, got {solver!r}")
    x, queries, y = np.asarray(x, np.float64), np.asarray(queries, np.float64), np.asarray(y, np.float64)
    order = np.argsort(cs, kind="stable")
    if solver == "jax":
        out = logreg.lbfgs_path(x, y, queries, cs, max_iter=max_iter, standardize=standardize)
    else:
        out = np.empty((len(cs), len(queries), y.shape[1]), np.float64)
    for k in range(y.shape[1]):
        known = ~np.isnan(y[:, k])
        values = np.unique(y[known, k])
        if len(values) < 2:
            out[:, :, k] = (2 * values[0] - 1) * 30.0 if len(values) else 0.0
            continue
        if solver == "jax":
            continue
        out[:, :, k] = _class_path(
            x[known], y[known, k], queries, cs, order, solver=solver, max_iter=max_iter, standardize=standardize
        )
    return out


def logreg_select(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cs: Sequence[float],
    names: Sequence[str],
    *,
    key: str = "auroc",
    **options: Any,
) -> tuple[int, list[float]]:
    """(index of the chosen C, validation score of every C): the highest, ties to the first in `cs`.
    `options` go to logreg_path (solver, max_iter, standardize)."""
    probs = logreg_path(*train, val[0], cs, **options)
    scores = [macro_score(val[1], p, names, key) for p in probs]
    return select_best(scores), scores


# --- the workflows ---------------------------------------------------------------------------------------


def _section(env: Any, name: str) -> Any:
    if name not in env.cfg:
        raise ValueError(
            f"the config has no {name} section: start from configs/eval/{name}_cxrlt.py (or add c.{name} as it does)"
        )
    return env.cfg[name]


def _features(env: Any, workdir: epath.Path) -> tuple[Any, dict, dict]:
    task, tables = workflows.task_tables(env, ("train", "val", "test"))
    feats = {s: embeddings.split_features(env, workdir, t) for s, t in tables.items()}
    return task, tables, feats


def _report(
    env: Any,
    workdir: epath.Path,
    task: Any,
    tables: dict,
    scores: np.ndarray,
    probs: np.ndarray,
    *,
    title: str,
    extra: dict,
    selection: dict,
) -> dict:
    """Test metrics with bootstrap CIs, the probes' report files, the probabilities as predictions.csv, and
    selection.json. `scores` (probabilities or logits) rank the test images for the metrics and curves."""
    m, table, names = env.cfg.metrics, tables["test"], task.class_names
    results = metrics.classification_metrics(
        table.labels, scores, names, n_bootstrap=int(m.n_bootstrap), seed=int(m.seed), confidence=float(m.confidence)
    )
    results.update(task=task.name, checkpoint=env.checkpoint, splits={k: len(v) for k, v in tables.items()}, **extra)
    if env.lead:
        out = workdir / "test"
        out.mkdir(parents=True, exist_ok=True)
        results["files"] = reports.write_report(
            out, results, labels=table.labels, probs=scores, class_names=names, title=title,
            plots=bool(env.cfg.report.plots),
        )  # fmt: skip
        workflows.write_predictions(out / "predictions.csv", table.image_id, probs, names, env.cfg.predict.id_column)
        reports.write_json(workdir / "selection.json", selection)
    return results


def run_knn(env: Any, workdir: epath.Path) -> dict:
    """Weighted kNN: every k of knn.ks scored on val (bank: train), the best k tested (bank: train [+ val])."""
    workdir = epath.Path(workdir)
    section = _section(env, "knn")
    task, tables, feats = _features(env, workdir)
    names, key = task.class_names, str(env.cfg.eval.selection_metric)
    ks, temperature = tuple(int(k) for k in section.ks), float(section.temperature)
    chunk, mesh = int(section.query_chunk), env.feeder.mesh
    train_y = tables["train"].labels
    val = knn.knn_scores(feats["train"], train_y, feats["val"], ks, temperature, chunk, mesh)
    val_scores = [macro_score(tables["val"].labels, fill_unscored(val[k], train_y), names, key) for k in ks]
    best = select_best(val_scores)
    k = ks[best]
    shown = ", ".join(f"k={kk}: {v:.4f}" for kk, v in zip(ks, val_scores))
    logging.info("knn: val %s %s; k = %d", key, shown, k)
    refit = bool(env.cfg.refit.enabled)
    bank_x = np.concatenate([feats["train"], feats["val"]]) if refit else feats["train"]
    bank_y = np.concatenate([train_y, tables["val"].labels]) if refit else train_y
    test = knn.knn_scores(bank_x, bank_y, feats["test"], ks, temperature, chunk, mesh)
    test = {kk: fill_unscored(s, bank_y) for kk, s in test.items()}
    per_k = {
        str(kk): {
            f"val_{key}": v,
            **{f"test_{m}": macro_score(tables["test"].labels, test[kk], names, m) for m in ("auroc", "ap")},
        }
        for kk, v in zip(ks, val_scores)
    }
    selection = {"selection_metric": key, "ks": list(ks), "val": val_scores, "best_k": k, "per_k": per_k}
    extra = {
        "workflow": "knn", "k": k, "temperature": temperature, "feature": "x_norm_clstoken (L2-normalised)",
        "bank": "train + val" if refit else "train", "per_k": per_k,
    }  # fmt: skip
    title = f"{task.name}: weighted kNN (k={k}), test"
    return _report(env, workdir, task, tables, test[k], test[k], title=title, extra=extra, selection=selection)


def run_logreg(env: Any, workdir: epath.Path) -> dict:
    """Logistic regression per class: C on val (fitted on train), refit on train + val, test."""
    workdir = epath.Path(workdir)
    lr = _section(env, "logreg")
    task, tables, feats = _features(env, workdir)
    names, key = task.class_names, str(env.cfg.eval.selection_metric)
    cs = tuple(float(c) for c in lr.cs)
    options = {"solver": str(lr.solver), "max_iter": int(lr.max_iter), "standardize": bool(lr.standardize)}
    train = (feats["train"], tables["train"].labels)
    best, val_scores = logreg_select(train, (feats["val"], tables["val"].labels), cs, names, key=key, **options)
    c = cs[best]
    logging.info("logreg: best C %g (val %s %.4f)", c, key, val_scores[best])
    refit = bool(env.cfg.refit.enabled)
    if refit:
        train = (np.concatenate([train[0], feats["val"]]), np.concatenate([train[1], tables["val"].labels]))
    logits = logreg_path(*train, feats["test"], (c,), **options)[0]
    with np.errstate(over="ignore"):
        probs = 1.0 / (1.0 + np.exp(-logits))
    selection = {"selection_metric": key, "cs": list(cs), "val": val_scores, "best_c": c}
    extra = {
        "workflow": "logreg", "c": c, "feature": "x_norm_clstoken", **options,
        "fit": "train + val" if refit else "train",
    }  # fmt: skip
    title = f"{task.name}: logistic regression (C={c:g}), test"
    return _report(env, workdir, task, tables, logits, probs, title=title, extra=extra, selection=selection)
