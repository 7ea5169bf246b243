"""The evaluation workflows' shared parts (environment, training and testing a head) and probe / OOD.

Each takes an `Environment` (the backbone on a mesh, frozen or trained with the head as `backbone.adapt`
says, and the config) and a work directory, and writes its results there: the trained head (a classifier dir
that `convert` exports to PyTorch) and a trained backbone (a weights dir), metrics with bootstrap CIs as JSON
and Markdown, curves, attention overlays and per-image predictions as CSV.
Only process 0 writes files; every process computes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from chexfound_jax.convert import peft_adapter
from chexfound_jax.convert.backbone import load_backbone
from chexfound_jax.data import classification, preprocess
from chexfound_jax.eval import finetune, loop, metrics, reports, tasks
from chexfound_jax.eval.probe import FrozenFeatures, HeadBank, Optimization, select_best, stack_heads
from chexfound_jax.jobs.checkpoint import Checkpointer
from chexfound_jax.jobs.logs import MetricsWriter
from chexfound_jax.models import classifiers, lora, weights
from chexfound_jax.models.model import ModelConfig

BACKBONE_DIR = "backbone"  # the adapted backbone of a fine-tuning run, next to its head (workdir/backbone)
ADAPTER_DIR = "adapter"  # LoRA: the adapter alone in peft's layout, inside BACKBONE_DIR


def backbone_features(cfg: Any, vit_cfg, params: dict, mesh, adapt: finetune.Adaptation | None = None):
    """(features, whole backbone state on the mesh): frozen and replicated, or with `adapt` the trainable
    backbone sharded by `parallel.rules`."""
    if adapt is not None:
        features = finetune.AdaptedFeatures(
            vit_cfg, params, int(cfg.backbone.n_last_blocks), cfg.backbone.dtype, adapt, mesh, cfg.parallel.rules
        )
        return features, features.state
    with jax.set_mesh(mesh):
        features = FrozenFeatures(vit_cfg, params, int(cfg.backbone.n_last_blocks), cfg.backbone.dtype)
    return features, jax.device_put(features.state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def head_config(h: Any, features: FrozenFeatures, num_classes: int, views: int = 1) -> classifiers.ClassifierConfig:
    """The classifier of the `head` section of an evaluation config on `features`."""
    if views > 1 and h.kind != "linear":
        raise ValueError(
            f"task.multiview gives {views} views per image, which only head.kind='linear' reads "
            f"(the official GLoRI ignores the second view); got head.kind={h.kind!r}"
        )
    return classifiers.ClassifierConfig(
        kind=h.kind,
        num_classes=num_classes,
        embed_dim=features.cfg.embed_dim,
        n_blocks=features.n_blocks,
        avgpool=h.avgpool,
        decoder_dim=h.decoder_dim,
        num_heads=h.num_heads,
        ffn_dim=h.ffn_dim,
        dropout=h.dropout,
        cat_cls=h.cat_cls,
        views=views,
    )


@dataclasses.dataclass
class Environment:
    """What every workflow shares: config, the frozen backbone on its mesh, and the batch feeder."""

    cfg: Any
    features: FrozenFeatures
    feeder: loop.Feeder
    checkpoint: str
    writer: MetricsWriter | None = None  # TensorBoard + metrics.jsonl of head training (process 0)
    adapt: finetune.Adaptation = dataclasses.field(default_factory=finetune.Adaptation)
    _banks: dict = dataclasses.field(default_factory=dict)

    @property
    def tuning(self) -> bool:
        """Whether head training trains the backbone too (backbone.adapt, in a training workflow)."""
        return isinstance(self.features, finetune.AdaptedFeatures)

    def use_backbone(self, directory: str | epath.Path) -> None:
        """Replaces the backbone with a saved one (an adapted backbone next to a head), frozen."""
        vit_cfg, params = load_backbone(directory)
        self.features, self.feeder.backbone = backbone_features(self.cfg, vit_cfg, params, self.feeder.mesh)
        self._banks.clear()
        self.checkpoint = str(directory)

    def write(self, step: int, prefix: str, name: str, values: Sequence[float], lrs: Sequence[float]) -> None:
        """Per-head scalars as `<prefix>/<name>/lr=<lr>` (phases and runs restart their steps at 1)."""
        if self.writer is not None:
            self.writer.write_scalars(step, {f"{prefix}/{name}/lr={lr:g}": v for lr, v in zip(lrs, values)})

    @property
    def lead(self) -> bool:
        return jax.process_index() == 0

    @property
    def datasets(self) -> list[str]:
        return list(self.cfg.data.datasets)

    def head_config(self, num_classes: int, views: int = 1) -> classifiers.ClassifierConfig:
        return head_config(self.cfg.head, self.features, num_classes, views)

    def bank(self, head_cfg: classifiers.ClassifierConfig, lrs: Sequence[float], train: bool = False) -> HeadBank:
        """The HeadBank of these heads, one per configuration: its compiled steps serve every run. `train`
        with a trainable backbone: the TunedBank training one head with it."""
        tuned = train and self.tuning
        key = (head_cfg, tuple(float(lr) for lr in lrs), tuned)
        if key not in self._banks:
            t = self.cfg.train
            opt = Optimization(key[1], t.weight_decay, t.asymmetric_loss)
            kind = finetune.TunedBank if tuned else HeadBank
            self._banks[key] = kind(head_cfg, opt, self.features, self.feeder.mesh)
        return self._banks[key]

    def records(self, *tables: tasks.LabelTable) -> classification.LabelledRecords:
        return classification.LabelledRecords(self.datasets, tables)

    def batch_for(self, n: int) -> int:
        """The configured global batch, capped at the set size and kept a multiple of the device count."""
        devices = self.feeder.mesh.size
        batch = min(int(self.cfg.train.batch_size), n)
        batch -= batch % devices
        if batch < devices:
            raise ValueError(f"{n} training images cannot fill a batch over {devices} devices")
        return batch


# --- training a head ------------------------------------------------------------------------------


def _validation_scores(
    env: Environment, bank: HeadBank, state: dict, val: classification.LabelledRecords, names: Sequence[str]
) -> list[float]:
    probs = loop.predict(env.feeder, bank, state["params"], state["rest"], val)
    key = env.cfg.eval.selection_metric
    if key not in ("auroc", "ap"):
        raise ValueError(f"eval.selection_metric must be 'auroc' or 'ap', got {key!r}")
    return [metrics.classification_metrics(val.labels, p, names, n_bootstrap=0)["macro"][key] for p in probs]


def _checkpointer(env: Environment, directory: epath.Path | None) -> Checkpointer | None:
    every = int(env.cfg.train.checkpoint_every)
    if directory is None or every <= 0:
        return None
    return Checkpointer(directory, save_every=every, keep_last=1)


def _fit(
    env: Environment,
    bank: HeadBank,
    state: dict,
    records,
    *,
    seed: int,
    steps: int,
    log: dict,
    ckpt_dir: epath.Path | None,
    prefix: str,
    on_step=None,
) -> dict:
    ckpt = _checkpointer(env, ckpt_dir)
    try:
        return loop.fit(
            env.feeder,
            bank,
            state,
            records,
            seed=seed,
            steps=steps,
            log=log,
            on_step=on_step,
            on_log=lambda step, losses: env.write(step, prefix, "train_loss", losses, bank.lrs),
            log_every=int(env.cfg.train.log_every),
            checkpointer=ckpt,
            config=env.cfg,
        )
    finally:
        if ckpt is not None:
            ckpt.close()


def train_head(
    env: Environment,
    train: tasks.LabelTable,
    val: tasks.LabelTable,
    names: Sequence[str],
    *,
    refit: bool,
    seed: int,
    log: dict,
    ckpt_dir: epath.Path | None = None,
    run: str = "probe",
) -> tuple[classifiers.ClassifierConfig, Any, Any, float]:
    """Phase 1 (all lrs, select on val) and, if `refit`, phase 2 (best lr, train + val); -> (cfg, params, rest, lr).

    With `ckpt_dir`, each phase checkpoints there (train.checkpoint_every) and a rerun resumes it. Losses
    and validation scores go to TensorBoard as `<run>/<phase>/...`.
    """
    t = env.cfg.train
    records = env.records(train)
    head_cfg = env.head_config(len(names), records.views)
    batch = env.batch_for(len(records))
    epoch = classification.num_batches(len(records), batch)
    total = int(t.val_epochs) * epoch
    env.feeder.global_batch = batch
    bank = env.bank(head_cfg, t.lrs, train=True)
    val_records = env.records(val)
    period = max(1, int(t.eval_period_epochs) * epoch)
    phase1: dict = {"images": len(records), "batch": batch, "steps": total, "lrs": list(t.lrs), "evals": []}

    def on_step(step: int, state: dict) -> None:
        if step % period == 0 or step == total:
            _use_trained_backbone(env, bank, state)
            scores = _validation_scores(env, bank, state, val_records, names)
            phase1["evals"].append({"step": step, "epoch": step / epoch, "val": scores})
            env.write(step, f"{run}/phase1", f"val_{env.cfg.eval.selection_metric}", scores, bank.lrs)
            logging.info("step %d val %s per lr: %s", step, env.cfg.eval.selection_metric, np.round(scores, 4))

    logging.info("phase 1: %d heads, %d images, batch %d, %d steps", bank.size, len(records), batch, total)
    if env.tuning:
        logging.info("backbone.adapt=%s: the backbone trains with the head, lr %g", env.adapt.mode, env.adapt.lr)
    state = _fit(
        env,
        bank,
        bank.init(seed, total),
        records,
        seed=seed,
        steps=total,
        log=phase1,
        on_step=on_step,
        ckpt_dir=ckpt_dir and ckpt_dir / "phase1",
        prefix=f"{run}/phase1",
    )
    final = phase1["evals"][-1]["val"]
    best = select_best(final)
    lr = float(t.lrs[best])
    phase1.update(best_index=best, best_lr=lr, best_val=final[best])
    log["phase1"] = phase1
    params, rest = bank.head(state, best)
    _use_trained_backbone(env, bank, state)
    if not refit:
        return head_cfg, params, rest, lr
    records = env.records(train, val)
    batch = env.batch_for(len(records))
    total = int(t.epochs) * classification.num_batches(len(records), batch)
    env.feeder.global_batch = batch
    bank = env.bank(head_cfg, (lr,), train=True)
    if env.cfg.refit.warm_start and env.tuning:  # the phase-1 head and backbone, fresh optimiser
        state = bank.restart(state, total)
    elif env.cfg.refit.warm_start:  # the official phase 2 resumes the phase-1 winner's weights
        state = bank.from_heads(*stack_heads([(params, rest)]), total)
    else:
        state = bank.init(seed + 1, total)
    phase2: dict = {
        "images": len(records),
        "batch": batch,
        "steps": total,
        "lr": lr,
        "warm_start": bool(env.cfg.refit.warm_start),
    }
    logging.info("phase 2 (refit): lr %g, %d images (train + val), batch %d, %d steps", lr, len(records), batch, total)
    state = _fit(
        env,
        bank,
        state,
        records,
        seed=seed + 1,
        steps=total,
        log=phase2,
        ckpt_dir=ckpt_dir and ckpt_dir / "phase2",
        prefix=f"{run}/phase2",
    )
    log["phase2"] = phase2
    params, rest = bank.head(state, 0)
    _use_trained_backbone(env, bank, state)
    return head_cfg, params, rest, lr


def _use_trained_backbone(env: Environment, bank: HeadBank, state: dict) -> None:
    """With a trainable backbone, prediction (validation, test, overlays) reads the one in `state`."""
    if isinstance(bank, finetune.TunedBank):
        env.feeder.backbone = bank.backbone_state(state)


# --- testing a head -------------------------------------------------------------------------------


def check_views(head_cfg: classifiers.ClassifierConfig, views: int, where: str) -> None:
    """A head reads the number of views it was trained on."""
    if head_cfg.views != views:
        raise ValueError(
            f"{where}: the head takes {head_cfg.views} view(s) per image, the data gives {views} "
            "(task.multiview must match the head's training)"
        )


def predict_head(env: Environment, head_cfg, params, rest, records: classification.LabelledRecords) -> np.ndarray:
    """(N, K) probabilities of one head."""
    check_views(head_cfg, records.views, "predict")
    bank = env.bank(head_cfg, (0.0,))
    stacked = stack_heads([(params, rest)])
    return loop.predict(env.feeder, bank, *stacked, records)[0]


def write_predictions(
    path: epath.Path, ids: Sequence[str], probs: np.ndarray, names: Sequence[str], id_column: str
) -> None:
    """The per-image probability CSV (CXR-LT submission layout with id_column="dicom_id")."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([id_column, *names])
    for i, row in zip(ids, probs):
        w.writerow([i, *(f"{p:.6f}" for p in row)])
    path.write_text(buf.getvalue())


def display_image(records: classification.LabelledRecords, row: int, size: int) -> np.ndarray:
    """The (size, size) uint8 grayscale evaluation crop of a row, for overlays."""
    img = Image.fromarray(classification.augment.to_uint8(records.image(row)))
    return np.asarray(preprocess.center_crop(preprocess.resize_shorter(img, size), size))


def write_overlays(
    env: Environment,
    out: epath.Path,
    head_cfg,
    params,
    rest,
    records: classification.LabelledRecords,
    probs: np.ndarray,
    names: Sequence[str],
) -> list[str]:
    """GLoRI attention overlays (official notebook) of the first test images, for their most probable classes."""
    n = min(int(env.cfg.report.overlays), len(records))
    if head_cfg.kind != "glori" or n == 0:
        return []
    size = env.feeder.transform.image_size
    grid = size // env.features.cfg.patch_size
    bank = env.bank(head_cfg, (0.0,))
    written = []
    for row in range(n):  # every process computes (the head lives on the whole mesh); process 0 writes
        x = classification.eval_image(records.image(row), size)[None]
        _, attn = bank.attention(params, rest, env.feeder.backbone, x)
        attn = multihost_utils.process_allgather(attn, tiled=True)
        if not env.lead:
            continue
        top = np.argsort(-probs[row])[: int(env.cfg.report.overlay_classes)]
        written += reports.save_attention_overlays(
            out / f"image_{row:04d}",
            display_image(records, row, size),
            np.asarray(attn[0]),
            (grid, grid),
            names,
            classes=[int(k) for k in top],
            probs=probs[row],
        )
    return [str(p) for p in written]


def test_head(
    env: Environment,
    out: epath.Path,
    head_cfg,
    params,
    rest,
    table: tasks.LabelTable,
    names: Sequence[str],
    *,
    title: str,
    extra: dict,
    plots: bool = True,
) -> dict:
    """Test-set probabilities -> metrics with CIs, reports, predictions CSV (and overlays)."""
    m = env.cfg.metrics
    records = env.records(table)
    probs = predict_head(env, head_cfg, params, rest, records)
    results = metrics.classification_metrics(
        table.labels, probs, names, n_bootstrap=int(m.n_bootstrap), seed=int(m.seed), confidence=float(m.confidence)
    )
    results.update(extra)
    plots = plots and bool(env.cfg.report.plots)
    if env.lead:
        out.mkdir(parents=True, exist_ok=True)
        results["files"] = reports.write_report(
            out, results, labels=table.labels, probs=probs, class_names=names, title=title, plots=plots
        )
        write_predictions(out / "predictions.csv", table.image_id, probs, names, env.cfg.predict.id_column)
    if plots:
        results["overlays"] = write_overlays(env, out / "attention", head_cfg, params, rest, records, probs, names)
    return results


def save_head(env: Environment, directory: epath.Path, head_cfg, params, rest, metadata: dict) -> None:
    """The trained head as a classifier dir (gathered from the mesh; written by process 0)."""
    module = env.bank(head_cfg, (0.0,)).module(params, rest)
    state = multihost_utils.process_allgather(nnx.state(module).to_pure_dict(), tiled=True)
    if env.lead:
        classifiers.save_classifier(directory, head_cfg, jax.tree.map(np.asarray, state), metadata)


def save_backbone(env: Environment, directory: epath.Path) -> None:
    """The trained backbone as a weights dir (LoRA merged into the kernels: plain ViT weights that `convert
    --to=pytorch` exports), and for LoRA the adapter alone in peft's layout under `adapter/`. A rerun that
    resumed a finished training writes them again."""
    adapt = env.features.adapt
    state = multihost_utils.process_allgather(nnx.to_pure_dict(env.feeder.backbone), tiled=True)
    if not env.lead:
        return
    state = jax.tree.map(np.asarray, state)
    if directory.exists():
        directory.rmtree()
    merged = state
    if adapt.mode == "lora":
        merged = jax.tree.map(np.asarray, lora.merge_params(state, adapt.lora.scale))
        peft_adapter.write_adapter(directory / ADAPTER_DIR, state, adapt.lora)
    weights.save_weights(directory, ModelConfig(backbone=env.features.source_cfg), {"backbone": merged})


# --- workflows ------------------------------------------------------------------------------------


def task_tables(env: Environment, splits: Sequence[str]) -> tuple[tasks.TaskSpec, dict[str, tasks.LabelTable]]:
    task = tasks.task_from_config(env.cfg.task)
    tables = tasks.load_task(env.datasets, task, splits=tuple(splits))
    for name, table in tables.items():
        if len(table) == 0:
            raise ValueError(f"task {task.name}: the {name} split is empty in {env.datasets}")
    return task, tables


def _head_metadata(env: Environment, task: tasks.TaskSpec, lr: float, log: dict) -> dict:
    adapted = {"adapt": env.adapt.mode, "backbone_dir": BACKBONE_DIR} if env.tuning else {}
    return {
        **adapted,
        "task": task.name,
        "class_names": list(task.class_names),
        "lr": lr,
        "backbone_checkpoint": env.checkpoint,
        "image_size": env.feeder.transform.image_size,
        "training": {k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "evals")} for k, v in log.items()},
    }


def run_probe(env: Environment, workdir: epath.Path) -> dict:
    """Linear or GLoRI probe: select the lr on val, refit on train + val (unless disabled), test."""
    task, tables = task_tables(env, ("train", "val", "test"))
    names = task.class_names
    log: dict = {}
    head_cfg, params, rest, lr = train_head(
        env,
        tables["train"],
        tables["val"],
        names,
        refit=bool(env.cfg.refit.enabled),
        seed=int(env.cfg.train.seed),
        log=log,
        ckpt_dir=workdir / "checkpoints",
    )
    if env.tuning:
        save_backbone(env, workdir / BACKBONE_DIR)
    save_head(env, workdir / "head", head_cfg, params, rest, _head_metadata(env, task, lr, log))
    extra = {
        "task": task.name,
        "head": head_cfg.kind,
        "lr": lr,
        "checkpoint": env.checkpoint,
        "splits": {k: len(v) for k, v in tables.items()},
    }
    results = test_head(
        env,
        workdir / "test",
        head_cfg,
        params,
        rest,
        tables["test"],
        names,
        title=f"{task.name}: {head_cfg.kind} probe, test",
        extra=extra,
    )
    if env.lead:
        reports.write_json(workdir / "training.json", log)
    return results


def load_head(env: Environment, directory: str) -> tuple[classifiers.ClassifierConfig, Any, Any, dict]:
    """A saved head as (cfg, params, rest, metadata), checked against the backbone."""
    if not directory:
        raise ValueError("no head given: set ood.head / predict.head to a trained head directory")
    cfg, state, meta = classifiers.load_classifier(directory)
    if meta.get("backbone_dir"):  # trained with its backbone (backbone.adapt): that backbone, not --checkpoint
        backbone = epath.Path(directory).parent / meta["backbone_dir"]
        logging.info("%s was trained with backbone.adapt=%s: using its backbone %s", directory, meta["adapt"], backbone)
        env.use_backbone(backbone)
    if cfg.embed_dim != env.features.cfg.embed_dim or cfg.n_blocks != env.features.n_blocks:
        raise ValueError(
            f"{directory}: head expects {cfg.n_blocks} blocks of width {cfg.embed_dim}, the backbone gives "
            f"{env.features.n_blocks} of width {env.features.cfg.embed_dim} (backbone.n_last_blocks)"
        )
    module = classifiers.classifier_from_state(cfg, state)
    _, params, rest = nnx.split(module, nnx.Param, ...)
    names = meta.get("class_names") or _unnamed_head_classes(env, directory, cfg.num_classes)
    return cfg, params, rest, {**meta, "class_names": list(names)}


def _unnamed_head_classes(env: Environment, directory: str, num_classes: int) -> list[str]:
    """Class names for a head saved without them (e.g. converted from a PyTorch file): the configured
    task's when it has as many classes (the released 40-class head with task cxr_lt), else class_<k>."""
    task = tasks.task_from_config(env.cfg.task)
    if len(task.class_names) == num_classes:
        logging.info("%s names no classes: using task %s's %d class names", directory, task.name, num_classes)
        return list(task.class_names)
    logging.warning(
        "%s names no classes and task %s has %d, not %d: columns are class_<k>",
        directory, task.name, len(task.class_names), num_classes,
    )  # fmt: skip
    return [f"class_{k}" for k in range(num_classes)]


def run_ood(env: Environment, workdir: epath.Path) -> dict:
    """A head trained on one task, tested on another task's test split, on the classes both name."""
    head_cfg, params, rest, meta = load_head(env, env.cfg.ood.head)
    task, tables = task_tables(env, ("test",))
    table = tables["test"]
    head_names = [n.lower() for n in meta["class_names"]]
    pairs = [(head_names.index(n.lower()), k) for k, n in enumerate(task.class_names) if n.lower() in head_names]
    if not pairs:
        raise ValueError(f"head classes {meta['class_names']} share no class with task {task.name} {task.class_names}")
    records = env.records(table)
    probs = predict_head(env, head_cfg, params, rest, records)
    head_idx, task_idx = (list(x) for x in zip(*pairs))
    names = [task.class_names[k] for k in task_idx]
    m = env.cfg.metrics
    results = metrics.classification_metrics(
        table.labels[:, task_idx],
        probs[:, head_idx],
        names,
        n_bootstrap=int(m.n_bootstrap),
        seed=int(m.seed),
        confidence=float(m.confidence),
    )
    results.update({"task": task.name, "head_dir": env.cfg.ood.head, "head_task": meta.get("task")})
    if env.lead:
        workdir.mkdir(parents=True, exist_ok=True)
        results["files"] = reports.write_report(
            workdir,
            results,
            labels=table.labels[:, task_idx],
            probs=probs[:, head_idx],
            class_names=names,
            title=f"out of distribution: {meta.get('task')} head on {task.name}",
            plots=bool(env.cfg.report.plots),
        )
        write_predictions(
            workdir / "predictions.csv", table.image_id, probs, meta["class_names"], env.cfg.predict.id_column
        )
    return results
