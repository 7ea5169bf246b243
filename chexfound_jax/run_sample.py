r"""The main job end to end on the bundled sample data (tiny model, CPU), as a smoke run.

  python -m chexfound_jax.run_sample --workdir=/tmp/chexfound_sample

Stages so far: import a PyTorch CheXFound teacher checkpoint (the bundled tiny one, produced by the
official code) into JAX weights; embed the bundled chest X-rays with it; export the weights back to
the official `teacher_checkpoint.pth` layout and check the file is bit-identical to the original.
Later stages (prepare shards, pretrain, evaluate) join this run as they land.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags, logging
from etils import epath

from chexfound_jax import embed
from chexfound_jax.convert import export_state_dict, import_state_dict, torch_io
from chexfound_jax.models import weights
from chexfound_jax.models.build import model_from_params

SAMPLE_DATA = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; must not hold a previous run).")
_DATA = flags.DEFINE_string("data_dir", str(SAMPLE_DATA), "Bundled sample data (the repository's tests/data).")

TINY_NUM_HEADS = 4  # the bundled tiny backbone has 16-d heads, not DINOv2's 64-d


def run(workdir: epath.Path, data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    teacher = data_dir / "golden" / "vit_tiny_teacher_checkpoint.pth"
    images = sorted((data_dir / "images").glob("*.png"))

    logging.info("1/3 import %s", teacher)
    original = torch_io.read_checkpoint(teacher)
    cfg, params = import_state_dict(original, num_heads=TINY_NUM_HEADS)
    weights.save_weights(workdir / "weights", cfg, params)

    logging.info("2/3 embed %d X-rays", len(images))
    cfg, params = weights.load_weights(workdir / "weights")
    model = model_from_params(cfg.backbone, params["backbone"])
    features = embed.embed_images(model, images, batch_size=2)
    with (workdir / "features.npz").open("wb") as f:
        np.savez(f, **features)

    logging.info("3/3 export to the official PyTorch layout")
    exported = export_state_dict(cfg, params, "chexfound")
    torch_io.write_checkpoint(exported, workdir / "teacher_checkpoint.pth", wrapper="teacher")
    reread = torch_io.read_checkpoint(workdir / "teacher_checkpoint.pth")["teacher"]
    mismatched = [k for k in original["teacher"] if not np.array_equal(reread.get(k), original["teacher"][k])]
    if mismatched or list(reread) != list(original["teacher"]):
        raise RuntimeError(f"exported checkpoint differs from the original, first at {mismatched[:1]}")
    return features


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = epath.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    features = run(workdir, pathlib.Path(_DATA.value))
    print(
        f"embedded {len(features['paths'])} images: cls_token {features['cls_token'].shape}, "
        f"patch_tokens {features['patch_tokens'].shape} -> {workdir / 'features.npz'}"
    )
    print(f"round trip JAX -> {workdir / 'teacher_checkpoint.pth'}: bit-identical to the official file")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
