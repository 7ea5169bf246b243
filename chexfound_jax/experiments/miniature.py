r"""CheXFound in miniature: does the recipe learn on real chest X-rays? One command, resumable.

  python -m chexfound_jax.experiments.miniature --workdir=DIR [--data_dir=DIR] [--config.optim.epochs=...]
      [--supervised_steps=0] [--noglori]   # ablations: linear probes of the pretrained arms only

1. The labelled images (default: the 400 paediatric X-rays bundled in tests/data) are split once by
   patient (seeded) into a pretraining pool (80%) and a held-out test set (20%), and built into data_prep
   shards: split `train` = the pool, split `test` = the test set.
2. `chexfound_jax.pretrain` runs `configs/pretrain/mini_cpu.py` (overrides: --config.*) on the pool's
   images only, labels unused, with the online kNN evaluation (pool -> test) every `eval_online.every`
   steps and the teacher exported every `train.export_every` steps.
3. The same probe code scores every arm: the ViT at its random initialisation (the run's own step-0
   teacher), the teacher at each export, and the same ViT trained from scratch on the pool's labels
   (chexfound_jax.experiments.supervised); and, as the floor to beat, a probe on image statistics alone
   (aspect ratio and intensity histogram). Probes, all trained on the pool with their hyper-parameter
   chosen by patient-grouped 5-fold cross-validation inside it, scored on the test set (AUROC with a
   bootstrap 95% CI; against the random initialisation, the paired bootstrap CI of the difference, the
   same test images resampled for both):
   - `linear`: the official logistic regression (DINOv2's eval/log_regression.py) on the final-norm
     class token as it comes, C from its 45-value grid;
   - `linear_std`: the same on [class token, mean patch token] with every dimension standardised, a
     probe that also reads directions of tiny variance (a random ViT's nearly constant class token);
   - `glori`: the GLoRI head (chexfound_jax.experiments.head_probe) on the random initialisation, the
     last teacher and the supervised model.

Writes DIR/results.json and DIR/report.md with its plots. Every stage keeps its outputs, so a rerun (or a
run killed part way) picks up where it stopped; the stage times add up over the invocations (timings.json).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from chexfound_jax import cli, pretrain
from chexfound_jax.data import classification
from chexfound_jax.eval import logreg, metrics, tasks
from chexfound_jax.experiments import head_probe, supervised
from chexfound_jax.models import weights
from chexfound_jax.train import recipe
from chexfound_jax.train import state as state_lib
from data_prep import retired_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / "tests" / "data" / "kermany_pediatric_pneumonia"
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "mini_cpu.py"
DATASET = "miniature"
OFFICIAL_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))  # the official logistic-regression sweep
PROBES = ("linear", "linear_std", "glori")
TASK = tasks.TaskSpec(
    name="miniature",
    class_names=("label",),
    splits={"train": tasks.SplitRule("train"), "test": tasks.SplitRule("test")},
)

# GLoRI, the official recipe shrunk to CPU: decoder 192 wide (4 heads, FFN 512) instead of 768, four of the
# official learning rates, 30 epochs instead of 100 (the official 100 epochs x 13 lrs x 6 fits would take
# hours per arm on 2 cores).
MINI_GLORI = head_probe.HeadProbe(lrs=(2e-4, 1e-3, 5e-3, 2e-2), epochs=30, decoder_dim=192, num_heads=4, ffn_dim=512)


@dataclasses.dataclass(frozen=True)
class Protocol:
    test_fraction: float = 0.2
    split_seed: int = 0
    folds: int = 5
    n_bootstrap: int = 2000
    bootstrap_seed: int = 0
    embed_batch: int = 32
    supervised_steps: int = 400  # the supervised-from-scratch arm (0: left out)
    supervised_batch: int = 16
    glori: head_probe.HeadProbe = MINI_GLORI
    glori_arms: bool = True  # GLoRI on random init, the last teacher and the supervised model


# --- 1. data -----------------------------------------------------------------------------------------


def split_csv(data: epath.Path, out: epath.Path, protocol: Protocol) -> dict[str, int]:
    """labels.csv plus a `split` column (train = pretraining pool, test = held out), split by patient_id."""
    rows = list(csv.DictReader((data / "labels.csv").open()))
    for column in ("file", "label", "patient_id"):
        if rows and column not in rows[0]:
            raise ValueError(f"{data / 'labels.csv'} has no {column!r} column")
    patients = np.asarray([r["patient_id"] for r in rows])
    part = tasks.holdout_parts(patients, (1 - protocol.test_fraction, protocol.test_fraction), protocol.split_seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "split"])
        writer.writeheader()
        for row, p in zip(rows, part):
            writer.writerow({**row, "split": ("train", "test")[int(p)]})
    return {"pool": int(np.sum(part == 0)), "test": int(np.sum(part == 1)), "patients": len(set(patients))}


def prepare(data: epath.Path, workdir: epath.Path, protocol: Protocol) -> epath.Path:
    """The data_prep dataset of the split images (built once; a rerun reuses it)."""
    from data_prep import local_runner, writers
    from data_prep import stages as prep
    from data_prep.sources import get_source

    dataset = writers.dataset_dir(workdir / "shards", DATASET, prep.DATASET_VERSION)
    if (dataset / "manifest.json").exists():
        return dataset
    labels = workdir / "labels_split.csv"
    counts = split_csv(data, labels, protocol)
    logging.info("patients split: %s", counts)
    source = get_source(
        "folder", data, csv=labels, path_column="file", label_columns=["label"], patient_column="patient_id",
        split_column="split", source_name=DATASET,
    )  # fmt: skip
    local_runner.run_local(source, workdir / "shards", prep.PrepOptions(size=256, min_size=200), workers=1)
    return dataset


# --- 2. pretraining ----------------------------------------------------------------------------------


def pretrain_config(cfg: Any, dataset: epath.Path) -> Any:
    """`cfg` reading the pool (split train), evaluating online pool -> test."""
    cfg = cfg.copy_and_resolve_references()
    cfg.data.datasets = (str(dataset),)
    cfg.data.split = "train"
    cfg.eval_online.datasets = (str(dataset),)
    cfg.eval_online.task.splits = {"train": {"shard_split": "train"}, "test": {"shard_split": "test"}}
    return cfg


# --- 3. probes ---------------------------------------------------------------------------------------


def arms(cfg: Any, run_dir: epath.Path) -> dict[str, tuple[int, dict]]:
    """{arm: (step, backbone params)}: the random initialisation (the run's step-0 teacher) and every export."""
    model_cfg = recipe.model_config(cfg)
    init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
    init = jax.jit(lambda k: state_lib.init_params(model_cfg, k)["backbone"])(init_key)
    out = {"random_init": (0, jax.tree.map(np.asarray, init))}
    export = run_dir / "export"
    for step_dir in sorted(export.iterdir()) if export.exists() else ():
        if step_dir.name.isdigit() and (step_dir / "teacher").exists():
            out[f"teacher_{int(step_dir.name)}"] = (
                int(step_dir.name),
                weights.load_weights(step_dir / "teacher")[1]["backbone"],
            )
    return out


def probe_features(vit_cfg: Any, backbone: dict, images: np.ndarray, protocol: Protocol) -> dict[str, np.ndarray]:
    """The heads' inputs of the last `glori.n_last_blocks` blocks (final norm), and the linear probes'
    inputs: "last_cls" (the last block's class token) and "cls_mean_patch" ([that, mean patch token])."""
    feats = head_probe.head_features(vit_cfg, backbone, images, protocol.glori.n_last_blocks, protocol.embed_batch)
    last_cls = feats["cls"][:, -vit_cfg.embed_dim :]
    return {**feats, "last_cls": last_cls, "cls_mean_patch": np.concatenate([last_cls, feats["avgpool"]], axis=1)}


def linear_probe(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    protocol: Protocol,
    *,
    standardize: bool = False,
) -> dict[str, Any]:
    """C by patient-grouped CV inside the pool, refitted on all of it; test AUROC with its bootstrap CI."""
    x, y, patients = train
    folds = logreg.grouped_folds(patients, protocol.folds, protocol.split_seed)
    c, cv = logreg.select_c(x, y, folds, OFFICIAL_C_GRID, standardize=standardize)
    scores = logreg.fit(x, y, c, standardize=standardize).decision(test[0])
    result = metrics.binary_metrics(test[1], scores, n_bootstrap=protocol.n_bootstrap, seed=protocol.bootstrap_seed)
    auc = result["macro"]
    return {"C": c, "cv_auroc": max(v for v in cv if np.isfinite(v)), "test_auroc": auc["auroc"],
            "test_auroc_ci": auc["auroc_ci"], "scores": scores.tolist()}  # fmt: skip


def image_statistics(image: np.ndarray, bins: int = 32) -> np.ndarray:
    """What a model could read without looking at anatomy: the stored image's aspect ratio, and its
    intensity histogram, mean and std (the baseline the learned features have to beat)."""
    x = np.asarray(image, np.float64) / (65535.0 if image.dtype == np.uint16 else 255.0)
    hist = np.histogram(x, bins=bins, range=(0.0, 1.0))[0] / x.size
    return np.concatenate([[np.log(x.shape[1] / x.shape[0]), x.mean(), x.std()], hist])


def statistics_arm(dataset: epath.Path, protocol: Protocol) -> dict:
    """The linear probes on image_statistics alone: the size of the image-statistics cue."""
    tables = tasks.load_task([dataset], TASK, ("train", "test"))
    feats = {}
    for name, table in tables.items():
        records = classification.LabelledRecords([dataset], [table])
        feats[name] = (
            np.stack([image_statistics(records.image(i)) for i in range(len(records))]),
            records.labels[:, 0],
        )
    train = (*feats["train"], np.asarray(tables["train"].patient_id))
    return {
        "step": 0,
        "linear": linear_probe(train, feats["test"], protocol),
        "linear_std": linear_probe(train, feats["test"], protocol, standardize=True),
    }


def probe_backbone(vit_cfg: Any, backbone: dict, data: dict, protocol: Protocol, glori: bool) -> dict[str, Any]:
    """The probes of one backbone's features, fitted on the pool (train), scored on the test set of `data`."""
    feats = {s: probe_features(vit_cfg, backbone, data[s][0], protocol) for s in ("train", "test")}
    (_, y, patients), y_test = data["train"], data["test"][1]

    def linear(key: str, standardize: bool) -> dict:
        return linear_probe((feats["train"][key], y, patients), (feats["test"][key], y_test), protocol,
                            standardize=standardize)  # fmt: skip

    out = {"linear": linear("last_cls", False), "linear_std": linear("cls_mean_patch", True)}
    if glori:
        out["glori"] = head_probe.glori_probe(
            (feats["train"], y, patients), (feats["test"], y_test), protocol.glori,
            n_bootstrap=protocol.n_bootstrap, bootstrap_seed=protocol.bootstrap_seed,
        )  # fmt: skip
    return out


def load_split(dataset: epath.Path, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (preprocessed images, labels (N,), patient ids)} for the pool (train) and the test set."""
    tables = tasks.load_task([dataset], TASK, ("train", "test"))
    out = {}
    for name, table in tables.items():
        records = classification.LabelledRecords([dataset], [table])
        images = np.stack([classification.eval_image(records.image(i), image_size) for i in range(len(records))])
        out[name] = (images, records.labels[:, 0], np.asarray(table.patient_id))
    return out


def evaluate_arms(cfg: Any, dataset: epath.Path, run_dir: epath.Path, out: epath.Path, protocol: Protocol) -> dict:
    """The probes of every arm (cached per arm in out/probes/<arm>.json)."""
    data = load_split(dataset, cfg.crops.global_crops_size)
    vit_cfg = recipe.model_config(cfg).backbone
    results = {}
    pretrained = arms(cfg, run_dir)
    last = max(pretrained, key=lambda n: pretrained[n][0])
    for name, (step, backbone) in pretrained.items():
        cache = out / "probes" / f"{name}.json"
        if cache.exists():
            results[name] = json.loads(cache.read_text())
            continue
        t0 = time.perf_counter()
        glori = protocol.glori_arms and name in ("random_init", last)
        results[name] = {"step": step, **probe_backbone(vit_cfg, backbone, data, protocol, glori)}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(results[name]))
        logging.info("%s: %s", name, _summary(results[name]))
    if "image_statistics" not in results:
        results["image_statistics"] = statistics_arm(dataset, protocol)
    if protocol.supervised_steps and "supervised" not in results:
        results["supervised"] = supervised_arm(cfg, dataset, data, out, protocol)
    y_test = data["test"][1]
    for probe in PROBES:
        base = np.asarray(results["random_init"][probe]["scores"]) if probe in results["random_init"] else None
        for r in results.values():
            if base is not None and probe in r:
                r[probe]["vs_random_init"] = metrics.paired_auroc_difference(
                    y_test, np.asarray(r[probe]["scores"]), base,
                    n_bootstrap=protocol.n_bootstrap, seed=protocol.bootstrap_seed,
                )  # fmt: skip
    return {"arms": results, "test_labels": y_test.tolist(), "n_pool": len(data["train"][1]), "n_test": len(y_test)}


def supervised_arm(cfg: Any, dataset: epath.Path, data: dict, out: epath.Path, protocol: Protocol) -> dict:
    """The same ViT trained from scratch on the pool's labels, then probed like every other arm."""
    cache = out / "probes" / "supervised.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    vit_cfg = recipe.model_config(cfg).backbone
    table = tasks.load_task([dataset], TASK, ("train",))["train"]
    sup = supervised.SupervisedConfig(
        steps=protocol.supervised_steps, batch_size=protocol.supervised_batch, seed=cfg.train.seed
    )
    backbone, losses = supervised.train(
        vit_cfg, classification.LabelledRecords([dataset], [table]), cfg.crops.global_crops_size, sup
    )
    probes = probe_backbone(vit_cfg, backbone, data, protocol, protocol.glori_arms)
    result = {"step": sup.steps, **probes, "train_loss": losses, "seconds": round(time.perf_counter() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    logging.info("supervised: %s", _summary(result))
    return result


def _summary(arm: dict) -> str:
    return ", ".join(f"{p} test AUROC {arm[p]['test_auroc']:.3f}" for p in PROBES if p in arm)


# --- the run -----------------------------------------------------------------------------------------


def online_curve(run_dir: epath.Path) -> list[dict]:
    """The online/* rows of the run's metrics.jsonl (the kNN curve), by step."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k.removeprefix("online/"): v for k, v in r.items()} for r in rows if "online/knn_auroc" in r]


def _accumulate(path: epath.Path, timings: dict[str, float]) -> dict[str, float]:
    """Stage seconds summed over every invocation on this workdir (a resumed run counts its earlier parts)."""
    total = json.loads(path.read_text()) if path.exists() else {}
    total = {k: round(total.get(k, 0.0) + v, 1) for k, v in timings.items()}
    path.write_text(json.dumps(total))
    return total


def run(
    cfg: Any,
    workdir: epath.Path,
    data: epath.Path,
    protocol: Protocol = Protocol(),
    devices: Sequence[Any] | None = None,
) -> dict:
    """Stages 1 to 3 (each skipped where its outputs exist) and the report; returns results.json's content."""
    from chexfound_jax.experiments import miniature_report

    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    dataset = prepare(data, workdir, protocol)
    timings["prepare_s"] = time.perf_counter() - t0
    cfg = pretrain_config(cfg, dataset)
    run_dir = workdir / "pretrain"
    t0 = time.perf_counter()
    pretrain.train(cfg, run_dir, devices=devices)
    timings["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_arms(cfg, dataset, run_dir, workdir, protocol)
    timings["probes_s"] = time.perf_counter() - t0
    results |= {
        "knn_curve": online_curve(run_dir),
        "protocol": dataclasses.asdict(protocol),
        "config": {
            "arch": cfg.model.arch,
            "steps": cfg.optim.epochs * cfg.optim.epoch_length,
            "global_batch_size": cfg.train.global_batch_size,
        },
        "timings_s": _accumulate(workdir / "timings.json", timings),
        "machine": miniature_report.machine(),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    miniature_report.write(workdir, results, run_dir, cfg)
    return results


def define_flags() -> None:
    """The program's flags, defined only when it runs as a program (importing the module claims no flag names)."""
    help_config = "Pretraining config file (default configs/pretrain/mini_cpu.py); --config.a.b=v overrides."
    config_flags.DEFINE_config_file("config", None, help_config)
    flags.DEFINE_string("workdir", None, "Output directory (resumable).", required=True)
    flags.DEFINE_string("data_dir", str(DEFAULT_DATA), "Folder with labels.csv (file, label, patient_id) and images.")
    retired_flags.define_renamed("data", "data_dir")
    flags.DEFINE_integer("supervised_steps", Protocol.supervised_steps, "Steps of the supervised arm (0: none).")
    flags.DEFINE_bool("glori", Protocol.glori_arms, "GLoRI probes (--noglori: linear probes only, for ablations).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        protocol = Protocol(supervised_steps=flags.FLAGS.supervised_steps, glori_arms=flags.FLAGS.glori)
        run(flags.FLAGS.config, epath.Path(flags.FLAGS.workdir), epath.Path(flags.FLAGS.data_dir), protocol)
    except (pretrain.ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"miniature: {e}") from None


if __name__ == "__main__":
    define_flags()
    cli.run(main, default_config=DEFAULT_CONFIG)
