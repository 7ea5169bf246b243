"""CheXFound in miniature: the paper recipe shrunk to learn something in about half an hour on 2 CPU cores.

Nothing the paper uses is switched off: ViT-S/16 with 4 registers, fused SwiGLU, LayerScale and batch-subset
stochastic depth; 2 global crops of 112 and 4 local crops of 48; DINO + iBOT (separate heads, block masks
on half the images, weight 3) + KoLeo with Sinkhorn-Knopp targets; AdamW with the paper's lr, weight decay,
teacher momentum and temperature schedules, rescaled to 600 steps (warm-ups at the paper's fractions of the
run). What shrinks: the model, the crops, the batch (8 images, one group: an official per-GPU batch) and
the heads (4096 prototypes). The miniature experiment (chexfound_jax.experiments.miniature) runs it on the
bundled paediatric X-rays.
"""

import ml_collections

from configs import common
from configs.pretrain import vitl16_512


def get_config() -> ml_collections.ConfigDict:
    c = vitl16_512.get_config()
    c.model.update(arch="vit_small", dtype="float32", remat="none", attention_impl="xla")
    c.crops.update(global_crops_size=112, local_crops_size=48, local_crops_number=4)
    c.dino.update(head_n_prototypes=4096, head_bottleneck_dim=256, head_hidden_dim=1024)
    c.ibot.update(head_n_prototypes=4096, head_bottleneck_dim=256, head_hidden_dim=1024, loss_chunk_size=0)
    c.train.update(global_batch_size=8, batch_groups=1)
    # 600 steps in 20 "epochs" of 30: lr warm-up 10% of the run (paper 10 of 100 epochs), teacher
    # temperature warm-up 30% (30 of 100), last layer frozen for the first 5% (paper 1%).
    c.optim.update(epochs=20, epoch_length=30, warmup_epochs=2, freeze_last_layer_epochs=1)
    c.teacher.update(warmup_teacher_temp_epochs=6)
    c.train.update(checkpoint_every=100, keep_last=2, keep_every=0, log_every=10, export_every=100)
    c.data.update(num_workers=0, read_threads=2, read_buffer=4)
    c.distributed.initialize = "never"
    c.parallel = common.parallel()
    c.eval_online.update(every=60, batch_size=32, image_size=112)
    return c
