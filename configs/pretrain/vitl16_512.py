"""The CheXFound 512-px pretraining stage (vitl16_ibot333_highres512 over DINOv2's defaults).

ViT-L/16 with 4 registers and fused SwiGLU; DINO (384-d bottleneck) + iBOT (256-d, weight 3)
with 131072 prototypes each, Sinkhorn-Knopp targets, KoLeo 0.1; 2 global crops of 512 and 8
local crops of 144; 100 epochs of 2500 iterations at a global batch of 80 (8 GPUs x 10). The
released model continued the 448 stage (vitl16_448.py): set train.init_from to its exported student.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        arch="vit_large",
        patch_size=16,
        num_register_tokens=4,
        ffn_layer="swiglufused",
        layerscale_init=1e-5,
        drop_path_rate=0.4,  # student only; the teacher runs without
        drop_path_mode="subset",  # DINOv2's batch-subset stochastic depth
        interpolate_offset=0.1,
        dtype="bfloat16",  # compute dtype; parameters and optimiser state stay float32
        # "auto": Pallas splash attention on TPU, cuDNN flash attention on GPU, XLA elsewhere; or "xla"
        # (the reference, materialises the T x T scores), "cudnn", "splash".
        attention_impl="auto",
        # What backward keeps of each block (models/vit.py REMAT_POLICIES): "none", "full", "dots", "offload".
        # "dots" (keep the weight matmuls' outputs, recompute the rest: ~5% more FLOPs) fits the official
        # 10 images per chip on every TPU measured, 16 GiB v5e included, and 64 per v5p chip in 83 GiB
        # (docs/compile_check.md); "full" (+25%) fits 64 per v5p chip in 24 GiB.
        remat="dots",
    )
    c.crops = dict(
        global_crops_size=512,
        local_crops_size=144,
        local_crops_number=8,
        global_crops_scale=(0.32, 1.0),
        local_crops_scale=(0.05, 0.32),
    )
    c.dino = dict(
        loss_weight=1.0,
        head_n_prototypes=131072,
        head_bottleneck_dim=384,
        head_hidden_dim=2048,
        head_nlayers=3,
        koleo_loss_weight=0.1,
    )
    c.ibot = dict(
        loss_weight=3.0,
        separate_head=True,
        head_n_prototypes=131072,
        head_bottleneck_dim=256,
        head_hidden_dim=2048,
        head_nlayers=3,
        mask_sample_probability=0.5,
        mask_ratio_min_max=(0.1, 0.5),
        # Masked-token logits (up to 2659 x 131072 per 8 images) in chunks of this many rows per group,
        # fused with Sinkhorn-Knopp and the loss so they never sit whole in memory; 0: whole.
        loss_chunk_size=256,
    )
    c.train = dict(
        global_batch_size=80,
        # Images are processed in groups the size of an official per-GPU batch: KoLeo neighbours and
        # iBOT masks are per group, so results do not depend on the mesh. -1: one group per batch shard.
        batch_groups=8,
        centering="sinkhorn_knopp",  # or "centering" (softmax with an EMA centre)
        center_momentum=0.9,
        seed=0,
        # The job (python -m chexfound_jax.pretrain): checkpoints, logs, exports, guards.
        checkpoint_every=2500,
        keep_last=3,
        keep_every=25000,  # also keep every multiple of this (0: only the last ones)
        log_every=10,
        export_every=25000,  # teacher_checkpoint.pth + JAX weights under workdir/export (0: never)
        on_nonfinite="stop",  # "stop": fail naming the step and last checkpoint; "skip": drop the update
        init_from="",  # weights dir of an earlier stage (export/<step>/student) to start from
        init_pos_embed="reinit",  # "reinit" (official: fresh pos_embed) or "resample" to the new grid
        peak_flops=0.0,  # FLOP/s per device for MFU; 0: from the device table
        stall_timeout_s=600.0,  # report an input pipeline that delivers nothing for this long
        profile_start=-1,  # first step of a profiler trace (workdir/profile); -1: none
        profile_steps=5,
    )
    c.distributed = common.distributed()
    # Online evaluation of the teacher during the run (chexfound_jax.eval.online): weighted kNN and a ridge
    # probe on a labelled, patient-split data_prep dataset, and collapse monitors. Off when every = 0.
    holdout = (0.8, 0.2)  # of the shard split's patients: probe/kNN train part, test part
    c.eval_online = dict(
        every=0,  # steps between evaluations (also at step 0 and the last step)
        datasets=(),  # labelled data_prep dataset directories
        task=dict(
            name="online",
            class_names=("label",),  # shard label names read as the classes
            splits=dict(
                train=dict(shard_split="train", holdout=holdout, part=0),
                test=dict(shard_split="train", holdout=holdout, part=1),
            ),
            split_seed=0,
            uncertain="ignore",
            missing="ignore",
        ),
        image_size=0,  # evaluation resize and centre crop; 0: crops.global_crops_size
        batch_size=64,  # images per embedding pass, over all devices
        k=20,  # DINO's weighted kNN: k neighbours, softmax(cosine / temperature) votes
        temperature=0.07,
        ridge_alpha=1.0,  # the linear probe's L2 penalty (closed-form ridge on standardised features)
    )
    c.debug = dict(inject_nan_at_step=-1)  # fault injection for testing the non-finite guard
    c.data = dict(
        datasets=(),  # data_prep dataset directories (<workdir>/<name>/<version>), local or gs://
        split="train",
        seed=0,
        photometric="device",  # "device": jitter/blur/solarize in JAX on the accelerator; "host": in workers
        skip_bad_records=False,  # True: a record that does not decode is replaced by the next and counted
        max_consecutive_bad=16,
        num_workers=8,  # grain worker processes per host (0: in the training process)
        read_threads=2,  # per worker; buffers count whole local batches (80 images on an 8-GPU host)
        read_buffer=4,
        device_prefetch=2,
    )
    c.optim = dict(
        epochs=100,
        epoch_length=2500,  # OFFICIAL_EPOCH_LENGTH
        base_lr=2e-4,  # for a global batch of 1024, sqrt-scaled
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.04,
        weight_decay_end=0.2,
        clip_grad=3.0,
        layerwise_decay=1.0,
        patch_embed_lr_mult=0.2,
        freeze_last_layer_epochs=1,
        adamw_beta1=0.9,
        adamw_beta2=0.999,
        adamw_eps=1e-8,
    )
    c.teacher = dict(
        momentum_teacher=0.994,
        final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
    )
    # FSDP over every chip (ZeRO-3: the 6 GiB of parameters and AdamW state split, activations per chip);
    # over several slices, data=<slices> keeps only the batch axis on the data-center network.
    c.parallel = common.parallel(dict(data=1, fsdp=-1), rules="fsdp")
    return c
