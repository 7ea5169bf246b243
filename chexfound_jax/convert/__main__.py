r"""Convert weights between PyTorch checkpoints and chexfound_jax weight directories.

# released CheXFound teacher -> JAX (architecture inferred from the tensor shapes)
python -m chexfound_jax.convert --to=jax --checkpoint=teacher_checkpoint.pth --out=weights/
# JAX -> the official teacher_checkpoint.pth layout (or --layout=hub|timm, or .safetensors)
python -m chexfound_jax.convert --to=pytorch --checkpoint=weights/ --out=teacher_checkpoint.pth
# classification heads (GLoRI / linear probe): a classifier dir <-> the official classifier checkpoint
python -m chexfound_jax.convert --to=pytorch --checkpoint=head_dir/ --out=model_final.pth
python -m chexfound_jax.convert --to=jax --checkpoint=model_final.pth --out=head_dir/ [--head_name=...] \
    [--head_classes=cxr_lt]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from chexfound_jax import cli
from chexfound_jax.convert import head_checkpoints, layouts, pytorch, torch_io
from chexfound_jax.data.classes import TASK_CLASSES
from chexfound_jax.models import classifiers, weights
from chexfound_jax.models.vit import count_params
from data_prep.retired_flags import define_renamed


def head_class_names(spec: str, num_classes: int) -> list[str]:
    """--head_classes as a list of num_classes names."""
    names = list(TASK_CLASSES[spec]) if spec in TASK_CLASSES else [n.strip() for n in spec.split(",")]
    if len(names) != num_classes:
        raise ValueError(f"--head_classes={spec} gives {len(names)} class names for a head of {num_classes} outputs")
    return names


def head_to_jax(
    obj: dict, out: str, name: str | None, num_heads: int, views: int = 1, classes: str | None = None
) -> None:
    name, sd = head_checkpoints.read_head_file(obj, name)
    parsed = head_checkpoints.parse_head_name(name) if name else {}
    cfg, state = head_checkpoints.import_classifier(
        sd,
        n_blocks=parsed.get("n_blocks", 4),
        avgpool=parsed.get("avgpool", False),
        num_heads=num_heads,
        views=views,
        where=f"{head_checkpoints.PREFIX}{name}." if name else "",
    )
    metadata = {"head_name": name, "lr": parsed["lr"]} if name else {}
    if classes:
        metadata["class_names"] = head_class_names(classes, cfg.num_classes)
    classifiers.save_classifier(out, cfg, state, metadata)
    logging.info("wrote %s: %s head, %d classes", out, cfg.kind, cfg.num_classes)


def head_to_pytorch(checkpoint: str, out: str, default_lr: float) -> None:
    cfg, state, metadata = classifiers.load_classifier(checkpoint)
    name = head_checkpoints.head_name(float(metadata.get("lr", default_lr)), cfg.n_blocks, cfg.avgpool)
    head_checkpoints.write_head_file(out, name, head_checkpoints.export_classifier(cfg, state))
    logging.info("wrote %s: %s head %s", out, cfg.kind, name)


def to_jax(obj: dict, out: str, source: str, num_heads: int | None, keep_heads: bool) -> None:
    cfg, params = pytorch.import_state_dict(obj, source=source, num_heads=num_heads)
    if not keep_heads:
        cfg = type(cfg)(backbone=cfg.backbone)
        params = {"backbone": params["backbone"]}
    weights.save_weights(out, cfg, params)
    logging.info("wrote %s: backbone %d params, heads %s", out, count_params(params["backbone"]), list(cfg.heads()))


def to_pytorch(checkpoint: str, out: str, layout: str, keep_heads: bool) -> None:
    cfg, params = weights.load_weights(checkpoint)
    if not keep_heads:
        cfg = type(cfg)(backbone=cfg.backbone)
    sd = pytorch.export_state_dict(cfg, params, layout)
    wrapper = "teacher" if layout == "chexfound" else None
    torch_io.write_checkpoint(sd, out, wrapper=wrapper)
    logging.info("wrote %s: %d tensors, %s layout", out, len(sd), layout)


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    flags.DEFINE_enum("to", None, ["jax", "pytorch"], "Direction of the conversion.")
    flags.DEFINE_string("checkpoint", None, "Input: .pth/.safetensors, or a weights / classifier dir.")
    flags.DEFINE_string("out", None, "Output: a weights / classifier dir, or .pth/.safetensors.")
    flags.DEFINE_enum("layout", "chexfound", list(layouts.LAYOUTS), "PyTorch key layout to write.")
    flags.DEFINE_enum("network", "teacher", list(pytorch.SOURCES), "Network to take from a model_checkpoint.pth.")
    flags.DEFINE_integer("num_heads", None, "Attention heads, if not embed_dim / 64 (DINOv2's sizes).")
    flags.DEFINE_bool("heads", True, "Keep the DINO / iBOT heads (--noheads: the backbone only).")
    flags.DEFINE_string("head_name", None, "Classifier head to take from a file holding several.")
    flags.DEFINE_float("head_lr", 0.001, "lr in the exported head's name, if the classifier dir has none.")
    flags.DEFINE_integer("head_num_heads", 8, "GLoRI attention heads (not visible in the shapes).")
    flags.DEFINE_integer("head_views", 1, "Views a linear head reads (2: trained with --multiview).")
    flags.DEFINE_string(
        "head_classes", None, "Class names of an imported head: a task name (e.g. cxr_lt) or comma-separated names."
    )
    define_renamed("source", "network")  # data_prep.build's --source names a dataset adapter
    define_renamed("no_heads", "heads", "was replaced by --noheads")
    flags.mark_flags_as_required(["to", "checkpoint", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if flags.FLAGS.to == "jax":
            obj = torch_io.read_checkpoint(flags.FLAGS.checkpoint)
            if head_checkpoints.is_head_checkpoint(obj):
                head_to_jax(
                    obj,
                    flags.FLAGS.out,
                    flags.FLAGS.head_name,
                    flags.FLAGS.head_num_heads,
                    flags.FLAGS.head_views,
                    flags.FLAGS.head_classes,
                )
            else:
                to_jax(obj, flags.FLAGS.out, flags.FLAGS.network, flags.FLAGS.num_heads, flags.FLAGS.heads)
        elif classifiers.is_classifier_dir(flags.FLAGS.checkpoint):
            head_to_pytorch(flags.FLAGS.checkpoint, flags.FLAGS.out, flags.FLAGS.head_lr)
        else:
            to_pytorch(flags.FLAGS.checkpoint, flags.FLAGS.out, flags.FLAGS.layout, flags.FLAGS.heads)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"convert: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
