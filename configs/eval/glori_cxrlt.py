"""GLoRI on CXR-LT 2024 (40 findings), the paper's main benchmark: --cat-cls, 13 lrs, refit, test.

The released 40-class CheXFound head was trained without --cat-cls; set head.cat_cls=False to match it.
"""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task.name = "cxr_lt"
    c.predict.id_column = "dicom_id"  # the CXR-LT submission layout
    return c
