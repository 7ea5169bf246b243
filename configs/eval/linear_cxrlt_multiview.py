"""Two-view linear probe on CXR-LT 2024 (the official --multiview with CXRLTMultiView).

Each image is paired with another image of its study (a lateral for a frontal and the reverse; an image
alone in its study is paired with itself), and the probe reads both views' class-token concatenations.
Multiview needs the studies' other images in the same shard split; GLoRI reads one view only.
"""

import ml_collections

from configs.eval import linear_cxrlt


def get_config() -> ml_collections.ConfigDict:
    c = linear_cxrlt.get_config()
    c.task.multiview = True
    return c
