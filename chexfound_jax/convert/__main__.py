r"""Convert weights between PyTorch checkpoints and chexfound_jax weight directories.

# released CheXFound teacher -> JAX (architecture inferred from the tensor shapes)
python -m chexfound_jax.convert --to=jax --checkpoint=teacher_checkpoint.pth --out=weights/
# JAX -> the official teacher_checkpoint.pth layout (or --layout=hub|timm, or .safetensors)
python -m chexfound_jax.convert --to=pytorch --checkpoint=weights/ --out=teacher_checkpoint.pth
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from chexfound_jax.convert import layouts, pytorch, torch_io
from chexfound_jax.models import weights
from chexfound_jax.models.vit import count_params

_TO = flags.DEFINE_enum("to", None, ["jax", "pytorch"], "Direction of the conversion.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Input: a .pth/.safetensors file or a JAX weights dir.")
_OUT = flags.DEFINE_string("out", None, "Output: a JAX weights dir, or a .pth/.safetensors file.")
_LAYOUT = flags.DEFINE_enum("layout", "chexfound", list(layouts.LAYOUTS), "PyTorch key layout to write.")
_SOURCE = flags.DEFINE_enum("source", "teacher", list(pytorch.SOURCES), "Model to take from a model_checkpoint.pth.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads, if not embed_dim / 64 (DINOv2's sizes).")
_NO_HEADS = flags.DEFINE_bool("no_heads", False, "Drop the DINO / iBOT heads (backbone only).")


def to_jax(checkpoint: str, out: str, source: str, num_heads: int | None, keep_heads: bool) -> None:
    cfg, params = pytorch.import_state_dict(torch_io.read_checkpoint(checkpoint), source=source, num_heads=num_heads)
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if _TO.value == "jax":
            to_jax(_CHECKPOINT.value, _OUT.value, _SOURCE.value, _NUM_HEADS.value, not _NO_HEADS.value)
        else:
            to_pytorch(_CHECKPOINT.value, _OUT.value, _LAYOUT.value, not _NO_HEADS.value)
    except (layouts.ConversionError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"convert: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["to", "checkpoint", "out"])
    app.run(main)
