"""A tiny variant of the paper recipe that runs the same code end to end on a CPU in seconds."""

import ml_collections

from configs import common
from configs.pretrain import vitl16_512


def get_config() -> ml_collections.ConfigDict:
    c = vitl16_512.get_config()
    c.model.update(arch="vit_small", patch_size=16, dtype="float32", remat="none")
    c.model.embed_dim = 64
    c.model.depth = 2
    c.model.num_heads = 4
    c.crops.update(global_crops_size=64, local_crops_size=32, local_crops_number=2)
    c.dino.update(head_n_prototypes=256, head_bottleneck_dim=32, head_hidden_dim=128)
    c.ibot.update(head_n_prototypes=256, head_bottleneck_dim=16, head_hidden_dim=128)
    c.train.update(global_batch_size=16, batch_groups=8)
    c.optim.update(epochs=2, epoch_length=25, warmup_epochs=1, freeze_last_layer_epochs=0)
    c.teacher.update(warmup_teacher_temp_epochs=1)
    c.data.update(num_workers=0, read_threads=2, read_buffer=8)
    c.train.update(checkpoint_every=10, keep_last=2, keep_every=0, log_every=5, export_every=50)
    c.distributed.initialize = "never"
    c.parallel = common.parallel()
    return c
