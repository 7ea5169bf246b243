"""The downstream protocol of CheXFound (official linear_glori.py), shared by the evaluation configs.

Defaults are the official scripts': GLoRI with --cat-cls on the last 4 blocks, 13 learning rates trained
at once, AdamW (weight decay 1e-4), cosine decay without warmup, 100 epochs, validation every 20 epochs,
refit on train + val with the best lr, global batch 256 (64 per GPU x 4), images 512. Where the official
code has a bug the default is the fix and a flag reproduces it (refit.warm_start).
"""

import ml_collections

from configs import common

LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workflow = "probe"  # probe | label_efficiency | ood | predict
    c.task = ml_collections.ConfigDict({"name": "cxr_lt"})  # eval.tasks.TASKS key, or a full task spec
    c.data = ml_collections.ConfigDict(
        dict(
            datasets=(),  # data_prep dataset dirs (<workdir>/<name>/1.0.0) holding the task's labelled shards
            image_size=512,
            train_scale=(0.75, 1.0),
            flip_p=0.5,
            rot90_p=0.0,  # --rot90-train: 0.5
            train_minmax=True,  # False: no per-channel min-max in training (official RescaleImage, data/transforms.py)
            read_threads=8,
            read_buffer=16,
            num_workers=0,
        )
    )
    c.backbone = ml_collections.ConfigDict(
        dict(
            n_last_blocks=4,
            dtype="bfloat16",  # frozen forward: bfloat16 or float32 (the official runs use fp16 autocast)
            num_heads=ml_collections.FieldReference(None, field_type=int),  # for .pth checkpoints not 64-d per head
            # What trains with the head (eval/finetune.py): frozen (the GLoRI recipe: an lr grid of heads on one
            # forward) | full (the official --fine-tune) | lora | bitfit. Not frozen: one head lr (train.lrs
            # holds one value) and the backbone's own lr.
            adapt="frozen",
            lr=1e-5,  # the official --fine-tune backbone lr; cosine decay with the head's
            layer_decay=1.0,  # layer-wise lr decay (e.g. 0.75); 1: none, as the official code
            drop_path_rate=0.0,  # stochastic depth while training the backbone; the official eval backbone has none
            remat="none",  # backbone rematerialisation while training it: none | full | dots | offload
            # peft's LoraConfig of the official LoRA option (models/lora.py)
            lora=dict(rank=16, alpha=16.0, dropout=0.1, target_modules=("qkv", "proj"), bias="lora_only"),
        )
    )
    c.head = ml_collections.ConfigDict(
        dict(kind="glori", decoder_dim=768, num_heads=8, ffn_dim=2048, dropout=0.1, cat_cls=True, avgpool=False)
    )
    c.train = ml_collections.ConfigDict(
        dict(
            lrs=LRS,
            weight_decay=1e-4,
            asymmetric_loss=False,  # --focal-loss
            batch_size=256,  # global; capped at the training set size
            val_epochs=100,  # phase 1 (selection) length
            epochs=100,  # phase 2 (refit) length
            eval_period_epochs=20,
            log_every=50,
            checkpoint_every=500,  # steps between head-training checkpoints (0: none); a rerun resumes
            seed=0,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            selection_metric="auroc",  # auroc | ap (macro)
            flip="none",  # none | only (the official --flip: mirrored images only) | average (both, mean probability)
        )
    )
    c.refit = ml_collections.ConfigDict(
        dict(
            enabled=True,  # phase 2: one head, best lr, train + val, evaluated on test
            warm_start=False,  # True reproduces the official bug: start from the phase-1 winner (linear_glori.py)
        )
    )
    c.label_efficiency = ml_collections.ConfigDict(dict(fractions=(0.01, 0.1, 1.0), repeats=3, seed=0))
    c.ood = ml_collections.ConfigDict(dict(head=""))  # a trained head dir (workdir/head of a probe run)
    c.predict = ml_collections.ConfigDict(
        dict(head="", images=(), split="", id_column="image_id", output="predictions.csv")
    )
    c.metrics = ml_collections.ConfigDict(dict(n_bootstrap=1000, confidence=0.95, seed=0))
    c.report = ml_collections.ConfigDict(dict(plots=True, overlays=4, overlay_classes=3))
    # The frozen backbone is replicated and the batch split over every device; fine-tuning a ViT-L at 512
    # shards it like pretraining: --config.parallel.mesh.data=1 --config.parallel.mesh.fsdp=-1
    # --config.parallel.rules=fsdp.
    c.parallel = common.parallel()
    c.distributed = common.distributed()
    return c
