"""GLoRI (--cat-cls) on CXR-LT with the whole backbone fine-tuned (the official --fine-tune option of linear_glori.py).

The backbone trains at the official 1e-5 with one head lr instead of the grid (docs/evaluation.md, Fine-tuning):
pick it with the frozen grid first (configs/eval/glori_cxrlt.py) and pass it as --config.train.lrs='(LR,)'. The
backbone and its AdamW moments are split over the devices as in pretraining (FSDP), with block rematerialisation;
bench/finetune_step.py sizes this step for a slice (docs/benchmarks.md). backbone.adapt=lora or bitfit trains
the adapters or the biases instead.
"""

import ml_collections

from configs.eval import glori_cxrlt


def get_config() -> ml_collections.ConfigDict:
    c = glori_cxrlt.get_config()
    c.backbone.update(adapt="full", remat="full")
    c.train.lrs = (1e-3,)
    c.parallel.update(mesh=dict(data=1, fsdp=-1), rules="fsdp")
    return c
