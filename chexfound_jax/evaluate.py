r"""Evaluate a CheXFound backbone on downstream chest X-ray tasks: linear / GLoRI probes and more.

  python -m chexfound_jax.evaluate --config=configs/eval/glori_cxrlt.py --checkpoint=WEIGHTS --workdir=OUT \
      --config.data.datasets='("gs://bucket/cxr_lt/1.0.0",)'

--checkpoint is a chexfound_jax weights directory (`convert --to=jax`, or a pretraining export) or a
PyTorch CheXFound/DINOv2 checkpoint (.pth / .safetensors, read with weights_only). `config.workflow`:

  probe             train heads on the frozen backbone (one per lr), select on val, refit on train + val,
                    test: workdir/head (a classifier dir), workdir/test (metrics, curves, overlays, CSV)
  label_efficiency  probes on seeded stratified patient-level fractions of train, several repeats
  ood               a trained head (ood.head) on another task's test split
  predict           per-image probabilities of a trained head (predict.head) as CSV, for the image or DICOM
                    files given as arguments (or predict.images), or a data_prep split (predict.split)

backbone.adapt=full | lora | bitfit trains the backbone (or its LoRA adapters / biases) with one head in probe
and label_efficiency (eval/finetune.py); the adapted backbone is saved as workdir/backbone, which ood and
predict load with the head next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from chexfound_jax import cli
from chexfound_jax.convert.backbone import load_backbone
from chexfound_jax.data import classification
from chexfound_jax.eval import feature_workflows, finetune, label_efficiency, loop, predict, workflows
from chexfound_jax.jobs.logs import MetricsWriter
from chexfound_jax.parallel import distributed
from chexfound_jax.parallel.mesh import create_mesh

WORKFLOWS = {
    "probe": workflows.run_probe,
    "label_efficiency": label_efficiency.run,
    "ood": workflows.run_ood,
    "predict": predict.run,
    "knn": feature_workflows.run_knn,
    "logreg": feature_workflows.run_logreg,
}
# Workflows that train the backbone when backbone.adapt is not "frozen" (ood and predict read the backbone
# saved next to their head).
TRAINING_WORKFLOWS = ("probe", "label_efficiency")


def environment(cfg: Any, checkpoint: str, devices: Sequence[jax.Device] | None = None) -> workflows.Environment:
    """The backbone on the configured mesh (frozen: replicated; trained, `backbone.adapt`: sharded by
    `parallel.rules`), and the batch feeder."""
    adapt = finetune.adaptation(cfg, training=cfg.workflow in TRAINING_WORKFLOWS)
    vit_cfg, params = load_backbone(checkpoint, cfg.backbone.num_heads)
    mesh = create_mesh(dict(cfg.parallel.mesh), devices)
    trains = adapt.trains and cfg.workflow in TRAINING_WORKFLOWS
    features, backbone = workflows.backbone_features(cfg, vit_cfg, params, mesh, adapt if trains else None)
    d = cfg.data
    transform = classification.TrainTransform(
        image_size=int(d.image_size),
        scale=tuple(d.train_scale),
        flip_p=float(d.flip_p),
        rot90_p=float(d.rot90_p),
        minmax=bool(d.train_minmax),
    )
    eval_batch = max(mesh.size, int(cfg.eval.batch_size) // mesh.size * mesh.size)
    feeder = loop.Feeder(
        mesh=mesh,
        backbone=backbone,
        transform=transform,
        global_batch=int(cfg.train.batch_size),
        eval_batch=eval_batch,
        read_threads=int(d.read_threads),
        read_buffer=int(d.read_buffer),
        num_workers=int(d.num_workers),
        eval_flip=str(cfg.eval.flip),
    )
    return workflows.Environment(cfg=cfg, features=features, feeder=feeder, checkpoint=str(checkpoint), adapt=adapt)


def evaluate(
    cfg: Any,
    checkpoint: str,
    workdir: str | epath.Path,
    images: Sequence[str] = (),
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Runs `cfg.workflow`; returns its results (also written under workdir)."""
    workdir = epath.Path(workdir)
    if cfg.workflow not in WORKFLOWS:
        raise ValueError(f"workflow must be one of {list(WORKFLOWS)}, got {cfg.workflow!r}")
    if not cfg.data.datasets and cfg.workflow != "predict":
        raise ValueError("data.datasets is empty: name the data_prep dataset dirs holding the task's shards")
    env = environment(cfg, checkpoint, devices)
    with MetricsWriter(workdir, enabled=env.lead) as writer:
        writer.write_config(cfg)
        env.writer = writer
        if cfg.workflow == "predict":
            return predict.run(env, workdir, images)
        return WORKFLOWS[cfg.workflow](env, workdir)


def define_flags() -> None:
    """The program's flags; defined only when run as a program, so importing `evaluate` claims no flag names."""
    config_flags.DEFINE_config_file("config", None, "Evaluation config file.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Backbone: a weights directory, or a .pth / .safetensors file.")
    flags.DEFINE_string("workdir", None, "Output directory (local or gs://).")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv: Sequence[str]) -> None:
    cfg = flags.FLAGS.config
    if len(argv) > 1 and cfg.workflow != "predict":
        raise app.UsageError(f"unexpected arguments: {argv[1:]} (image files are for workflow=predict)")
    try:
        distributed.initialize(cfg.distributed)
        results = evaluate(cfg, flags.FLAGS.checkpoint, flags.FLAGS.workdir, argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    macro = results.get("macro")
    if macro:
        logging.info("test macro AUROC %.4f, mAP %.4f", macro["auroc"], macro["ap"])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
