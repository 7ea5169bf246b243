"""Logistic-regression solvers on frozen features: the project's Newton and JAX L-BFGS solvers against scikit-learn's.

The logreg workflow fits one L2 logistic regression per class and C (DINOv2's eval/log_regression.py sweeps
45 C values; the official fits run cuML). Both solvers here minimise the same objective, scikit-learn's
0.5 ||w||^2 + C * sum(log-loss) with an unpenalised intercept, in float64:

  newton  chexfound_jax.eval.logreg.fit: Newton steps with a backtracking line search (NumPy; each step
          forms the (D+1)^2 Hessian, O(N D^2))
  lbfgs   sklearn.linear_model.LogisticRegression(solver="lbfgs", tol=1e-12, max_iter=--lbfgs_max_iter),
          the official protocol's settings; each iteration O(N D)
  jax     chexfound_jax.eval.logreg.lbfgs_path: optax's L-BFGS on every class at once (sweeps only), float64
          off TPUs; each iteration O(N D K) in one matmul

Features are synthetic (Gaussian, with a few strong directions as class tokens have), labels from a
noisy linear rule at --prevalence. For each --rows and --cs: seconds per fit (median of --repeats), the
solver's iterations, and the objective each reached (the gap says whether L-BFGS stopped short). With
--sweep_solvers, also the seconds of the whole official sweep (45 C values, each fit warm-started from the
previous, as the workflow runs it: eval/feature_workflows.logreg_path) for --sweep_classes label columns
(each its own noisy linear rule): scikit-learn and Newton fit the classes one after another, jax all at once.

    python -m bench.logreg_solvers --rows=10000,30000,100000 --dim=1024 --cs=1e-4,1e-1,100 --out=logreg.json

Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np
from absl import app, flags

from chexfound_jax import cli
from chexfound_jax.eval import feature_workflows, logreg

SOLVERS = ("newton", "lbfgs")  # single fits; sweeps also take "jax"
OFFICIAL_CS = tuple(float(c) for c in np.logspace(-6, 5, 45))  # as configs/eval/logreg_cxrlt.py
MAX_ITER = {"newton": 100, "lbfgs": 1000, "jax": 1000}  # the workflow's defaults


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_list("rows", ["10000", "30000", "100000"], "Training rows, a ladder (smallest first).", **fv)
    flags.DEFINE_integer("dim", 1024, "Feature width (ViT-L class token: 1024).", lower_bound=1, **fv)
    flags.DEFINE_list("cs", ["1e-4", "1e-1", "100"], "Inverse penalties C (official sweep: 1e-6 .. 1e5).", **fv)
    flags.DEFINE_list("solvers", list(SOLVERS), f"Which of {SOLVERS}.", **fv)
    help_sweep = f"Which of {feature_workflows.SOLVERS} to time over the official 45-C sweep (empty: none)."
    flags.DEFINE_list("sweep_solvers", ["lbfgs"], help_sweep, **fv)
    flags.DEFINE_list("sweep_classes", ["1"], "Label columns of each sweep (CXR-LT: 40), one sweep per value.", **fv)
    flags.DEFINE_float("prevalence", 0.1, "Fraction of positive labels.", **fv)
    flags.DEFINE_integer("lbfgs_max_iter", 1000, "L-BFGS iteration cap (official DEFAULT_MAX_ITER: 1000).", **fv)
    flags.DEFINE_integer("repeats", 1, "Timed fits per setting (median).", lower_bound=1, **fv)
    flags.DEFINE_float("budget_s", 1800.0, "Skip the remaining (larger) row counts once this much time is spent.", **fv)
    flags.DEFINE_integer("seed", 0, "Data seed.", **fv)
    flags.DEFINE_string("out", None, "Also write the results to this JSON file.", **fv)


def synthetic(n: int, d: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 features and (n,) labels in {0, 1} from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x[:, :8] *= 4.0  # a few dominant directions
    w = rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    margin = x @ w + 0.5 * rng.standard_normal(n).astype(np.float32)
    y = (margin > np.quantile(margin, 1.0 - prevalence)).astype(np.float64)
    return x, y


def more_labels(x: np.ndarray, y: np.ndarray, classes: int, prevalence: float, seed: int) -> np.ndarray:
    """(n, classes) labels: `y` and classes - 1 more columns, each from its own noisy linear rule on `x`."""
    rng = np.random.default_rng(seed + 1)
    out = [y]
    for _ in range(classes - 1):
        margin = x @ (rng.standard_normal(x.shape[1]).astype(np.float32) / np.sqrt(x.shape[1]))
        margin = margin + 0.5 * rng.standard_normal(len(x)).astype(np.float32)
        out.append((margin > np.quantile(margin, 1.0 - prevalence)).astype(np.float64))
    return np.stack(out, axis=1)


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, c: float) -> float:
    m = np.asarray(x, np.float64) @ w + b
    return float(0.5 * w @ w + c * np.sum(np.logaddexp(0.0, m) - y * m))


def fit_once(solver: str, x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> dict:
    t0 = time.perf_counter()
    if solver == "newton":
        model = logreg.fit(x, y, c)
        w, b, iters = model.w, model.b, None
    else:
        from sklearn.linear_model import LogisticRegression  # the [test] extra

        est = LogisticRegression(C=c, solver="lbfgs", tol=1e-12, max_iter=max_iter).fit(x.astype(np.float64), y)
        w, b, iters = est.coef_[0], float(est.intercept_[0]), int(est.n_iter_[0])
    return {"seconds": time.perf_counter() - t0, "iterations": iters, "objective": objective(x, y, w, b, c)}


def sweep_seconds(solver: str, x: np.ndarray, y: np.ndarray) -> float:
    """Seconds of the official sweep of the (n, K) labels `y` as the workflow runs it (scores for 1,000 queries)."""
    t0 = time.perf_counter()
    feature_workflows.logreg_path(x, y, x[:1000], OFFICIAL_CS, solver=solver, max_iter=MAX_ITER[solver])
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    unknown = sorted(set(f.solvers) - set(SOLVERS)) + sorted(set(f.sweep_solvers) - set(feature_workflows.SOLVERS))
    if unknown:
        raise app.UsageError(f"unknown solvers {unknown}: --solvers takes {SOLVERS}, --sweep_solvers also 'jax'")
    import sklearn

    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(f"machine: {machine}; numpy {np.__version__}, scikit-learn {sklearn.__version__}")
    results: dict = {"machine": machine, "dim": f.dim, "prevalence": f.prevalence, "runs": []}
    start = time.perf_counter()
    for n in (int(r) for r in f.rows):
        if time.perf_counter() - start > f.budget_s:
            print(f"rows {n}: skipped (--budget_s {f.budget_s:g} spent)")
            results["runs"].append({"rows": n, "skipped": True})
            continue
        x, y = synthetic(n, f.dim, f.prevalence, f.seed)
        for c in (float(v) for v in f.cs):
            row: dict = {"rows": n, "c": c}
            for solver in f.solvers:
                fits = [fit_once(solver, x, y, c, f.lbfgs_max_iter) for _ in range(f.repeats)]
                row[solver] = {**fits[-1], "seconds": statistics.median(fit["seconds"] for fit in fits)}
            if set(SOLVERS) <= set(row):
                gap = row["lbfgs"]["objective"] - row["newton"]["objective"]
                row["lbfgs_objective_gap"] = gap / max(abs(row["newton"]["objective"]), 1e-300)
            results["runs"].append(row)
            shown = ", ".join(
                f"{s} {row[s]['seconds']:.2f} s" + (f" ({row[s]['iterations']} it)" if row[s]["iterations"] else "")
                for s in f.solvers
            )
            gap = f", L-BFGS objective +{row['lbfgs_objective_gap']:.1e} rel." if "lbfgs_objective_gap" in row else ""
            print(f"rows {n} x {f.dim}, C {c:g}: {shown}{gap}", flush=True)
        for k in (int(v) for v in f.sweep_classes):
            labels = more_labels(x, y, k, f.prevalence, f.seed)
            for solver in f.sweep_solvers:
                seconds = sweep_seconds(solver, x, labels)
                run = {"rows": n, "sweep": solver, "classes": k, "cs": len(OFFICIAL_CS), "seconds": seconds}
                results["runs"].append(run)
                shown = f"{solver} sweep of {len(OFFICIAL_CS)} C values, {seconds:.1f} s"
                print(f"rows {n} x {f.dim}, {k} class(es): {shown}", flush=True)
    if f.out:
        pathlib.Path(f.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
