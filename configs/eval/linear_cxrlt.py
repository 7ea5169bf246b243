"""Linear probe (the official `LinearClassifier`) on CXR-LT 2024: concatenated class tokens of the last 4 blocks."""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task.name = "cxr_lt"
    c.head.kind = "linear"
    c.predict.id_column = "dicom_id"
    return c
