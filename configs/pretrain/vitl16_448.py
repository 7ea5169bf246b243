"""CheXFound high-resolution stage at 448 / 128 crops (vitl16_ibot333_highres448).

Global batch 112 (8 GPUs x 14), 250k iterations, started from the 224 stage's student with a fresh
pos_embed (set train.init_from to <224 workdir>/export/<step>/student). The released 512 model was
continued from this stage (per the official run log, logs/log.txt).
"""

import ml_collections

from configs.pretrain import vitl16_512


def get_config() -> ml_collections.ConfigDict:
    c = vitl16_512.get_config()
    c.crops.update(global_crops_size=448, local_crops_size=128)
    c.train.update(global_batch_size=112)
    return c
