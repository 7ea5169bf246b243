"""CheXFound stage 1 (vitl16_ibot333): ViT-L/16 from scratch on 224 / 96 crops.

Global batch 304 (8 GPUs x 38), 250k iterations; everything else as the 512 recipe.
"""

import ml_collections

from configs.pretrain import vitl16_512


def get_config() -> ml_collections.ConfigDict:
    c = vitl16_512.get_config()
    c.crops.update(global_crops_size=224, local_crops_size=96)
    c.train.update(global_batch_size=304)
    return c
