"""Label efficiency on CXR-LT 2024: GLoRI trained on 1%, 10% and 100% of train, 3 seeded repeats each.

Subsets are stratified and patient-level; validation only selects the lr and is never trained on
(official eval/classification/linear_glori.py appends it to the training set).
"""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workflow = "label_efficiency"
    c.task.name = "cxr_lt"
    c.label_efficiency.update(fractions=(0.01, 0.1, 1.0), repeats=3, seed=0)
    return c
