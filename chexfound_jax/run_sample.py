r"""The main job end to end on the bundled sample data (tiny model, CPU), as a smoke run.

  python -m chexfound_jax.run_sample --workdir=/tmp/chexfound_sample [--overwrite]

Stages: import a PyTorch CheXFound teacher checkpoint (the bundled tiny one, produced by the official
code) into JAX weights; embed the bundled chest X-rays with it; export the weights back to the
official `teacher_checkpoint.pth` layout and check the file is bit-identical to the original. Then
the pretraining chain: prepare shards from the bundled labelled X-rays with data_prep, pretrain the
tiny config on them for a few dozen steps, and embed an X-ray with the teacher the run exported as
`teacher_checkpoint.pth` (read back through the converter). Finally a GLoRI probe of that teacher on the
bundled pneumonia labels (patient-level train / val / test holdout): lr selection, refit, test AUROC with a
bootstrap CI, report, curves and attention overlays.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags, logging
from etils import epath

from chexfound_jax import cli, embed
from chexfound_jax.convert import export_state_dict, import_state_dict, torch_io
from chexfound_jax.models import weights
from chexfound_jax.models.build import model_from_params

SAMPLE_DATA = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"


PRETRAIN_STEPS = 24
# What a run writes under --workdir: all that --overwrite removes, and nothing else.
OUTPUTS = ("weights", "features.npz", "teacher_checkpoint.pth", "shards", "pretrain", "evaluate")
TINY_NUM_HEADS = 4  # the bundled tiny backbone has 16-d heads, not DINOv2's 64-d


def prepare_workdir(workdir: epath.Path, overwrite: bool = False) -> None:
    """Create `workdir`; refuse one holding a previous run's outputs before any work starts (a later stage
    would otherwise stop on them, or resume from them), or remove exactly those outputs with `overwrite`."""
    present = [name for name in OUTPUTS if (workdir / name).exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"{workdir} holds a previous sample run ({', '.join(present)}): pass --overwrite to replace it, "
            "or another --workdir"
        )
    for name in present:
        path = workdir / name
        path.rmtree() if path.is_dir() else path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)


def run(workdir: epath.Path, data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    teacher = data_dir / "golden" / "vit_tiny_teacher_checkpoint.pth"
    images = sorted((data_dir / "images").glob("*.png"))

    logging.info("1/7 import %s", teacher)
    original = torch_io.read_checkpoint(teacher)
    cfg, params = import_state_dict(original, num_heads=TINY_NUM_HEADS)
    weights.save_weights(workdir / "weights", cfg, params)

    logging.info("2/7 embed %d X-rays", len(images))
    cfg, params = weights.load_weights(workdir / "weights")
    model = model_from_params(cfg.backbone, params["backbone"])
    features = embed.embed_images(model, images, batch_size=2)
    with (workdir / "features.npz").open("wb") as f:
        np.savez(f, **features)

    logging.info("3/7 export to the official PyTorch layout")
    exported = export_state_dict(cfg, params, "chexfound")
    torch_io.write_checkpoint(exported, workdir / "teacher_checkpoint.pth", wrapper="teacher")
    reread = torch_io.read_checkpoint(workdir / "teacher_checkpoint.pth")["teacher"]
    mismatched = [k for k in original["teacher"] if not np.array_equal(reread.get(k), original["teacher"][k])]
    if mismatched or list(reread) != list(original["teacher"]):
        raise RuntimeError(f"exported checkpoint differs from the original, first at {mismatched[:1]}")
    return features


def pretrain_chain(workdir: epath.Path, data_dir: pathlib.Path, steps: int = PRETRAIN_STEPS) -> dict[str, np.ndarray]:
    """Shards from the bundled X-rays -> tiny pretraining -> exported teacher_checkpoint.pth -> embeddings."""
    import jax

    from chexfound_jax import pretrain
    from configs.pretrain import tiny_cpu
    from data_prep import local_runner
    from data_prep import stages as prep
    from data_prep.sources import get_source

    logging.info("4/7 prepare shards from %s", data_dir / "kermany")
    source = get_source(
        "folder", data_dir / "kermany", csv="labels.csv", path_column="file", label_columns=["label"],
        patient_column="patient_id", source_name="kermany",
    )  # fmt: skip
    info = local_runner.run_local(source, workdir / "shards", prep.PrepOptions(size=96, min_size=200), progress=False)
    dataset = workdir / "shards" / "kermany" / prep.DATASET_VERSION

    logging.info("5/7 pretrain the tiny config for %d steps on %d images", steps, info["counts"]["written"])
    cfg = tiny_cpu.get_config()
    cfg.data.datasets = (str(dataset),)
    cfg.optim.update(epochs=1, epoch_length=steps)
    cfg.train.update(export_every=steps, checkpoint_every=steps)
    last = pretrain.train(cfg, workdir / "pretrain", devices=jax.devices()[:1])

    logging.info("6/7 embed an X-ray with the exported teacher_checkpoint.pth")
    export = workdir / "pretrain" / "export" / f"{steps:08d}"
    model_cfg, params = import_state_dict(
        torch_io.read_checkpoint(export / "teacher_checkpoint.pth"), num_heads=cfg.model.num_heads
    )
    model = model_from_params(model_cfg.backbone, params["backbone"])
    image = sorted((data_dir / "images").glob("*.png"))[:1]
    features = embed.embed_images(
        model, image, batch_size=1, image_size=cfg.crops.global_crops_size, n_last_blocks=cfg.model.depth
    )
    return {"loss": np.float32(last["total_loss"]), **features}


def evaluate_chain(workdir: epath.Path, steps: int = PRETRAIN_STEPS, epochs: int = 6) -> dict:
    """A GLoRI probe of the teacher pretrain_chain exported, on the sample shards' pneumonia label."""
    from chexfound_jax import evaluate
    from configs.eval import tiny_cpu
    from configs.pretrain import tiny_cpu as pretrain_config

    logging.info("7/7 GLoRI probe of the exported teacher on the sample pneumonia labels")
    cfg = tiny_cpu.get_config()
    cfg.data.datasets = (str(workdir / "shards" / "kermany" / "1.0.0"),)
    holdout = {"shard_split": "train", "holdout": (0.5, 0.25, 0.25)}
    cfg.task = {
        "name": "kermany_pneumonia",
        "class_names": ["Pneumonia"],
        "label_columns": ["label"],
        "splits": {split: {**holdout, "part": i} for i, split in enumerate(("train", "val", "test"))},
    }
    cfg.backbone.update(num_heads=TINY_NUM_HEADS, n_last_blocks=min(4, pretrain_config.get_config().model.depth))
    cfg.train.update(batch_size=8, val_epochs=epochs, epochs=epochs, eval_period_epochs=epochs)
    cfg.metrics.n_bootstrap = 200
    export = workdir / "pretrain" / "export" / f"{steps:08d}" / "teacher_checkpoint.pth"
    return evaluate.evaluate(cfg, str(export), workdir / "evaluate")


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    flags.DEFINE_string("workdir", None, "Output directory; one holding a previous run needs --overwrite.")
    flags.DEFINE_bool("overwrite", False, "Replace the outputs of a previous sample run in --workdir.")
    flags.DEFINE_string("data_dir", str(SAMPLE_DATA), "Bundled sample data (the repository's tests/data).")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = epath.Path(flags.FLAGS.workdir)
    try:
        prepare_workdir(workdir, flags.FLAGS.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"run_sample: {e}") from None
    features = run(workdir, pathlib.Path(flags.FLAGS.data_dir))
    print(
        f"embedded {len(features['paths'])} images: cls_token {features['cls_token'].shape}, "
        f"patch_tokens {features['patch_tokens'].shape} -> {workdir / 'features.npz'}"
    )
    print(f"round trip JAX -> {workdir / 'teacher_checkpoint.pth'}: bit-identical to the official file")
    chain = pretrain_chain(workdir, pathlib.Path(flags.FLAGS.data_dir))
    print(
        f"pretrained {PRETRAIN_STEPS} steps (final loss {float(chain['loss']):.3f}) -> "
        f"{workdir / 'pretrain' / 'export'}; embedded with its teacher_checkpoint.pth: cls_token "
        f"{chain['cls_token'].shape}"
    )
    results = evaluate_chain(workdir)
    macro = results["macro"]
    print(
        f"GLoRI probe of the exported teacher ({results['splits']} images per split): test AUROC "
        f"{macro['auroc']:.3f} (95% CI {macro['auroc_ci'][0]:.3f}-{macro['auroc_ci'][1]:.3f}) -> "
        f"{workdir / 'evaluate'}"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
