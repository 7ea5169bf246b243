"""L2 logistic regression on frozen class tokens (DINOv2's eval/log_regression.py) for CXR-LT 2024.

One binary classifier per class on the final-norm class tokens as they come, for each of the official 45
C values (10 ** linspace(-6, 5, 45)); the C with the best val macro AUROC, refitted on train + val (the
official final model), tested.
"""

import ml_collections
import numpy as np

from configs.eval import base

OFFICIAL_CS = tuple(float(c) for c in np.logspace(-6, 5, 45))  # official C_POWER_RANGE = linspace(-6, 5, 45)


def logreg_section() -> ml_collections.ConfigDict:
    # solver: "lbfgs" (scikit-learn, the official tol 1e-12; ~10x faster than Newton on CPU at 10k x 1024,
    # docs/benchmarks.md), "newton" (eval/logreg.py) or "jax" (eval/logreg.lbfgs_path: every class at once,
    # for an accelerator); max_iter: L-BFGS iterations (official 1000) or Newton steps (100 is ample);
    # standardize=True scales each dimension by the training rows' mean and std first
    return ml_collections.ConfigDict(dict(cs=OFFICIAL_CS, solver="lbfgs", max_iter=1000, standardize=False))


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workflow = "logreg"
    c.task.name = "cxr_lt"
    c.predict.id_column = "dicom_id"
    c.logreg = logreg_section()
    return c
