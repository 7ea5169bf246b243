"""L2-regularised logistic regression on frozen features, and its C chosen by patient-grouped cross-validation.

The objective is scikit-learn's (`LogisticRegression(C=C)`): 0.5 ||w||^2 + C * sum(log-loss), the
intercept not penalised, minimised by Newton's method with a backtracking line search in float64. The
official protocol (DINOv2's eval/log_regression.py) fits the features as they come; `standardize=True`
first scales each dimension by the training rows' mean and std (which lets the penalty see directions of
tiny variance, such as a nearly constant class token's). Newton needs a handful of (D+1)^2 solves, exact
to the tolerance for the few thousand rows and hundreds of dimensions probed here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chexfound_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    mean: np.ndarray  # (D,) standardisation of the training features (0 and 1 without it)
    std: np.ndarray
    w: np.ndarray  # (D,) on (x - mean) / std
    b: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.w + self.b

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N,) probability of the positive class."""
        return 1.0 / (1.0 + np.exp(-self.decision(x)))


def _objective(z: np.ndarray, y: np.ndarray, theta: np.ndarray, c: float) -> float:
    margin = z @ theta
    return 0.5 * theta[:-1] @ theta[:-1] + c * np.sum(np.logaddexp(0.0, margin) - y * margin)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    *,
    standardize: bool = False,
    max_iter: int = 100,
    tol: float = 1e-10,
    init: LogisticModel | None = None,
) -> LogisticModel:
    """The minimiser for labels y in {0, 1}; stops when the Newton decrement is below `tol`.

    `init` (a model fitted on the same rows, e.g. at the previous C of a sweep) is the starting point:
    the minimiser is the same, reached in fewer Newton steps.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(np.unique(y)) != 2 or not np.all((y == 0) | (y == 1)):
        raise ValueError("logistic regression needs labels 0 and 1, both present")
    if c <= 0:
        raise ValueError(f"C must be positive, got {c}")
    mean, std = (x.mean(0), x.std(0) + 1e-12) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    reg = np.ones(z.shape[1])
    reg[-1] = 0.0  # the intercept is not penalised
    theta = np.zeros(z.shape[1]) if init is None else np.append(init.w, init.b).astype(np.float64)
    if len(theta) != z.shape[1]:
        raise ValueError(f"init has {len(theta) - 1} weights for {z.shape[1] - 1} features")
    value = _objective(z, y, theta, c)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        grad = reg * theta + c * z.T @ (p - y)
        hess = np.diag(reg) + c * (z.T * (p * (1 - p))) @ z
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(theta)), grad)
        decrement = grad @ step
        if decrement / 2 <= tol * max(1.0, abs(value)):
            break
        t = 1.0
        while t > 1e-10:  # backtracking (Armijo) line search
            candidate = _objective(z, y, theta - t * step, c)
            if candidate <= value - 0.25 * t * decrement:
                break
            t /= 2
        theta, value = theta - t * step, candidate
    return LogisticModel(mean=mean, std=std, w=theta[:-1], b=float(theta[-1]))


def _mean_objective(params: tuple, x: jax.Array, y: jax.Array, known: jax.Array, c: jax.Array) -> jax.Array:
    """Sum over classes of scikit-learn's objective divided by C and the class's known rows (its minimiser
    unchanged; each class's term O(1), as scikit-learn's L-BFGS scales it)."""
    w, b = params
    z = x @ w + b
    loss = jnp.sum(jnp.where(known, jnp.logaddexp(0.0, z) - y * z, 0.0), axis=0)
    return jnp.sum((0.5 / c * jnp.sum(w * w, axis=0) + loss) / jnp.maximum(jnp.sum(known, axis=0), 1))


@jax.jit
def _lbfgs_fit(params: tuple, x: jax.Array, y: jax.Array, known: jax.Array, c: jax.Array, max_iter: jax.Array,
               tol: jax.Array) -> tuple:  # fmt: skip
    """The minimiser of _mean_objective by optax's L-BFGS (zoom line search) from `params`."""
    fun = functools.partial(_mean_objective, x=x, y=y, known=known, c=c)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad, ord=jnp.inf) >= tol))

    return jax.lax.while_loop(going, step, (params, opt.init(params)))[0]


def lbfgs_path(
    x: np.ndarray,
    y: np.ndarray,
    queries: np.ndarray,
    cs: Sequence[float],
    *,
    max_iter: int = 1000,
    tol: float = 1e-9,
    standardize: bool = False,
) -> np.ndarray:
    """(len(cs), Q, K) logits of every class's model for every C, all classes fitted at once in JAX.

    The classes' objectives are independent, so one L-BFGS run on their sum per C reaches each class's
    minimiser; rows whose label is NaN are left out of their class's loss. C in increasing order, each run
    starting from the previous minimiser. Stops when the largest gradient entry of the scaled objective is
    below `tol` or after `max_iter` iterations. float64 (the precision of the other solvers), float32 on TPUs,
    which have no float64. Classes with fewer than two label values are left out (their logits are the
    caller's to set).
    """
    x, queries, y = (np.asarray(a, np.float64) for a in (x, queries, y))
    if standardize:
        mean, std = x.mean(0), x.std(0) + 1e-12
        x, queries = (x - mean) / std, (queries - mean) / std
    f64 = jax.default_backend() != "tpu"
    out = np.empty((len(cs), len(queries), y.shape[1]), np.float64)
    with jax.enable_x64(f64):
        dtype = jnp.float64 if f64 else jnp.float32
        known = ~np.isnan(y)
        known &= (np.any(known & (y == 0), axis=0) & np.any(known & (y == 1), axis=0))[None, :]  # else unbounded
        data = (jnp.asarray(x, dtype), jnp.asarray(np.nan_to_num(y), dtype), jnp.asarray(known))
        params = (jnp.zeros((x.shape[1], y.shape[1]), dtype), jnp.zeros((y.shape[1],), dtype))
        q = jnp.asarray(queries, dtype)
        for i in np.argsort(cs, kind="stable"):
            c = jnp.asarray(cs[i], dtype)
            params = _lbfgs_fit(params, *data, c, jnp.int32(max_iter), jnp.asarray(tol, dtype))
            out[i] = np.asarray(q @ params[0] + params[1], np.float64)
    return out


def grouped_folds(groups: Sequence, n_folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each row: groups (patients) in a seeded random order, dealt to the folds so that the
    folds' row counts stay balanced; no group is in two folds."""
    ids, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} groups cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    fold_of_group = np.empty(len(ids), np.int64)
    sizes = np.zeros(n_folds, np.int64)
    for g in order[np.argsort(-counts[order], kind="stable")]:  # largest groups first, ties in seeded order
        f = int(np.argmin(sizes))
        fold_of_group[g] = f
        sizes[f] += counts[g]
    return fold_of_group[inverse.reshape(-1)]


def cross_validated_auroc(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, c: float, *, standardize: bool = False
) -> float:
    """Mean AUROC over folds of a model fitted on the other folds (folds lacking a class are skipped)."""
    scores = []
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        if len(np.unique(y[test])) == 2 and len(np.unique(y[train])) == 2:
            scores.append(metrics.auroc(y[test], fit(x[train], y[train], c, standardize=standardize).decision(x[test])))
    return float(np.mean(scores)) if scores else float("nan")


def select_c(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, cs: Sequence[float], *, standardize: bool = False
) -> tuple[float, list[float]]:
    """(best C, the cross-validated AUROC of every C); ties go to the smaller C (the stronger penalty)."""
    cv = [cross_validated_auroc(x, y, folds, c, standardize=standardize) for c in cs]
    best = max(range(len(cs)), key=lambda i: (np.nan_to_num(cv[i], nan=-1.0), -cs[i]))
    return float(cs[best]), cv
