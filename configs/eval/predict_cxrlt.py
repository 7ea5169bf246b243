"""Per-image probabilities of a trained CXR-LT head in the challenge submission layout (dicom_id + 40 columns).

Give images or DICOMs as arguments, or predict.split with data.datasets; set predict.head.
"""

import ml_collections

from configs.eval import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workflow = "predict"
    c.task.name = "cxr_lt"
    c.predict.update(id_column="dicom_id", output="cxrlt_submission.csv")
    return c
