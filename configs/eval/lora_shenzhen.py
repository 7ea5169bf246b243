"""GLoRI (--cat-cls) on `shenzhen` with the backbone adapted by LoRA (the official LoRA option of linear_glori.py).

The official peft settings (r 16, alpha 16, dropout 0.1, targets qkv / proj, bias lora_only) and backbone lr
(1e-5), one head lr instead of the grid (docs/evaluation.md, Fine-tuning): pick it with the frozen grid first
(configs/eval/glori_shenzhen.py) and pass it as --config.train.lrs='(LR,)'. The backbone, its adapters and
their AdamW moments are split over the devices as in pretraining, with block rematerialisation.
"""

import ml_collections

from configs.eval import glori_shenzhen


def get_config() -> ml_collections.ConfigDict:
    c = glori_shenzhen.get_config()
    c.backbone.update(adapt="lora", remat="full")
    c.train.lrs = (1e-3,)
    c.parallel.update(mesh=dict(data=1, fsdp=-1), rules="fsdp")
    return c
