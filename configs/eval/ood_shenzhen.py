"""Out of distribution: a CXR-LT head (its Tuberculosis output) tested on Shenzhen without training there.

Set ood.head to the `head` directory of a glori_cxrlt run.
"""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workflow = "ood"
    c.task.name = "shenzhen"
    return c
