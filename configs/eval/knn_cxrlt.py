"""Weighted kNN on frozen class tokens (DINOv2's eval/knn.py) for CXR-LT 2024.

Cosine similarity of the L2-normalised final-norm class tokens, a vote weighted by softmax(similarity /
0.07) over the k nearest training images, per class; the official k values at once, the best on val by
macro AUROC, tested with train + val as the neighbours (refit.enabled=False: train only).
"""

import ml_collections

from configs.eval import base


def knn_section() -> ml_collections.ConfigDict:
    # query_chunk: queries per similarity block (each block is query_chunk x train images on every device)
    return ml_collections.ConfigDict(dict(ks=(10, 20, 100, 200), temperature=0.07, query_chunk=1024))


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workflow = "knn"
    c.task.name = "cxr_lt"
    c.predict.id_column = "dicom_id"
    c.knn = knn_section()
    return c
