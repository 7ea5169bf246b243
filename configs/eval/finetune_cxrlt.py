"""GLoRI (--cat-cls) on CXR-LT with the whole backbone fine-tuned (the official --fine-tune option of linear_glori.py).

The backbone trains at the official 1e-5 with one head lr instead of the grid (docs/evaluation.md, Fine-tuning):
pick it with the frozen grid first (configs/eval/glori_cxrlt.py) and pass it as --config.train.lrs='(LR,)'. The
backbone and its AdamW moments are split over the devices as in pretraining (FSDP), with the `dots` remat policy
(the weight matmuls' outputs kept): the official 64 images per device then take 58 GiB of a v5p chip's 95, with
25% fewer FLOPs than `full` remat, which needs 12 GiB (bench/finetune_step.py, docs/benchmarks.md: use `full` on
smaller chips). backbone.adapt=lora or bitfit trains the adapters or the biases instead.
"""

import ml_collections

from configs.eval import glori_cxrlt


def get_config() -> ml_collections.ConfigDict:
    c = glori_cxrlt.get_config()
    c.backbone.update(adapt="full", remat="dots")
    c.train.lrs = (1e-3,)
    c.parallel.update(mesh=dict(data=1, fsdp=-1), rules="fsdp")
    return c
