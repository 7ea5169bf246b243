r"""Pretrain CheXFound: one config-driven job that survives preemption without losing or repeating work.

  python -m chexfound_jax.pretrain --config=configs/pretrain/vitl16_512.py --workdir=gs://bucket/run \
      [--config.train.global_batch_size=80 ...]

The workdir holds config.json, metrics.jsonl, TensorBoard events, checkpoints/ (orbax: the full train
state, the data-iterator position and the config per saved step) and export/<step>/ (the teacher as
the official teacher_checkpoint.pth, and teacher/ and student/ JAX weights directories). A run resumes
from the latest checkpoint in its workdir automatically, also onto another mesh or device count. On
SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) it checkpoints the current step and
exits cleanly. Every process of a multi-host job runs this same command (see docs/pretraining.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from chexfound_jax import cli, hardware
from chexfound_jax.data import batch_layout, pipeline
from chexfound_jax.errors import ConfigError
from chexfound_jax.eval.online import OnlineEval
from chexfound_jax.jobs import checkpoint, logs
from chexfound_jax.jobs.progress import Progress
from chexfound_jax.models import ModelConfig, weights
from chexfound_jax.models.vit import ViTConfig, count_params
from chexfound_jax.parallel import distributed
from chexfound_jax.train import flops
from chexfound_jax.train.setup import Training, batch_shards, build_training

SMALL_GLOBAL_BATCH = 64  # below this the DINO/iBOT targets of a step are noisy (paper: 80 to 304)


# --- config validation -----------------------------------------------------------------------------


def unknown_keys(cfg: Any, reference: Any, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that the reference config (the paper recipe every config derives from) lacks."""
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if key not in reference:
            out.append(name)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            out += unknown_keys(value, reference[key], name + ".")
    return out


def dataset_image_size(dataset: str) -> int | None:
    """The stored shorter side of a data_prep dataset (from its manifest), if known."""
    manifest = epath.Path(dataset) / "manifest.json"
    if not manifest.exists():
        return None
    return int(json.loads(manifest.read_text())["options"]["size"])


def validate(cfg: Any, num_devices: int) -> list[str]:
    """Raises ConfigError for a config that cannot run; returns warnings for one that runs poorly."""
    from configs.pretrain import vitl16_512

    vit_fields = {f.name for f in dataclasses.fields(ViTConfig)}  # model.* overrides any ViTConfig field
    extra = [k for k in unknown_keys(cfg, vitl16_512.get_config()) if k.removeprefix("model.") not in vit_fields]
    if extra:
        raise ConfigError(f"unknown config keys: {', '.join(extra)}")
    mesh = {k: int(v) for k, v in cfg.parallel.mesh.items()}
    fixed = math.prod(v for v in mesh.values() if v != -1)
    if sum(v == -1 for v in mesh.values()) > 1:
        raise ConfigError(f"parallel.mesh {mesh}: at most one axis may be -1")
    if fixed > num_devices or num_devices % fixed:
        raise ConfigError(f"parallel.mesh {mesh} needs {fixed} devices (or a multiple), but {num_devices} are present")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: name the data_prep dataset directories to train on")
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    if g % cfg.model.patch_size or s % cfg.model.patch_size:
        raise ConfigError(f"crops ({g}, {s}) must be multiples of model.patch_size {cfg.model.patch_size}")
    for dataset in cfg.data.datasets:
        if not epath.Path(dataset).exists():
            raise ConfigError(f"data.datasets: {dataset} does not exist")
        size = dataset_image_size(dataset)
        if size is not None and g > size:
            raise ConfigError(f"crops.global_crops_size {g} is larger than the images of {dataset} ({size} px)")
    online = cfg.eval_online
    if online.every < 0:
        raise ConfigError(f"eval_online.every must be >= 0 (0: off), got {online.every}")
    if online.every and not online.datasets:
        raise ConfigError("eval_online.every is set but eval_online.datasets is empty: name labelled datasets")
    for dataset in online.datasets if online.every else ():
        if not epath.Path(dataset).exists():
            raise ConfigError(f"eval_online.datasets: {dataset} does not exist")
    warnings = []
    batch = cfg.train.global_batch_size
    if batch < SMALL_GLOBAL_BATCH:
        warnings.append(f"train.global_batch_size {batch} is small (the paper uses 80 to 304)")
    groups = cfg.train.batch_groups
    if groups > 0 and batch % groups == 0 and batch // groups == 1 and cfg.dino.koleo_loss_weight:
        warnings.append("KoLeo with one image per group is zero (its nearest neighbour is itself); raise the batch")
    return warnings


def check_mesh(cfg: Any, training: Training) -> None:
    shards = batch_shards(training.rules, training.mesh)
    groups = batch_layout.batch_groups(cfg, shards)
    if groups % shards:
        raise ConfigError(
            f"train.batch_groups={groups} groups cannot be split over the {shards} devices of the batch axes "
            f"of mesh {dict(training.mesh.shape)}"
        )


# --- the job ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM: the loop checkpoints the current step and stops."""

    requested: bool = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: checkpointing the current step, then stopping")
        self.requested = True


def _is_schedule_count(x: Any) -> bool:
    """An optax state holding only a step count: the lr and weight-decay schedules' (Adam's carries moments)."""
    return getattr(x, "_fields", None) == ("count",)


def guarded_step(step_fn, on_nonfinite: str):
    """With on_nonfinite="skip", a step whose loss or gradient norm is not finite leaves the parameters and
    Adam's moments and bias-correction count unchanged, while every schedule stays on the step count, as
    the official loop (schedules indexed by the iteration; GradScaler skips optimizer.step) does."""
    if on_nonfinite != "skip":
        return step_fn

    def step(state, batch):
        new, m = step_fn(state, batch)
        ok = jnp.isfinite(m["total_loss"]) & jnp.isfinite(m["grad_norm"])
        kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        opt_state = jax.tree.map(
            lambda k, n: n if _is_schedule_count(k) else k, kept.opt_state, new.opt_state, is_leaf=_is_schedule_count
        )
        kept = kept.replace(step=new.step, opt_state=opt_state)  # teacher momentum and temperature follow step
        return kept, {**m, "skipped_nonfinite": jnp.where(ok, 0, 1)}

    return step


def export(workdir: epath.Path, step: int, model_cfg: ModelConfig, state: Any, lead: bool) -> None:
    """Teacher as the official teacher_checkpoint.pth (if torch is installed), teacher and student as JAX weights.

    Every process calls this: parameters sharded across hosts are gathered first, and orbax writes the
    weights directories with all processes taking part; only the lead process writes the .pth.
    """
    out = workdir / "export" / f"{step:08d}"
    teacher = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.teacher, tiled=True))
    student = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.student, tiled=True))
    weights.save_weights(out / "teacher", model_cfg, teacher)
    weights.save_weights(out / "student", model_cfg, student)
    if not lead:
        return
    try:
        from chexfound_jax.convert import export_state_dict, torch_io

        torch_io.write_checkpoint(
            export_state_dict(model_cfg, teacher, "chexfound"), out / "teacher_checkpoint.pth", "teacher"
        )
    except ImportError as e:
        logging.warning("teacher_checkpoint.pth not written (%s); install the [torch] extra", e)
    logging.info("exported step %d to %s", step, out)


def evaluate_online(online: OnlineEval, step: int, state: Any, writer: logs.MetricsWriter, lead: bool) -> None:
    """Logs the online/* figures of the teacher at `step` (every process embeds its share)."""
    values = online(state.teacher["backbone"])
    writer.write_scalars(step, values)
    if lead:
        logging.info("step %d online | %s", step, " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items()))


def init_from(training: Training, state: Any, source: str, pos_embed: str) -> Any:
    """Student (and teacher = student) from a weights directory of an earlier stage, as the official code does:
    pos_embed re-initialised ("reinit", official) or resampled to the new grid ("resample")."""
    prev_cfg, prev = weights.load_weights(source)
    student = jax.device_get(state.student)
    for name in student:
        if name not in prev:
            raise ConfigError(f"train.init_from {source} has no {name!r} parameters")
    new = jax.tree.map(np.asarray, {k: prev[k] for k in student})
    fresh = np.asarray(student["backbone"]["pos_embed"])
    old = new["backbone"]["pos_embed"]
    if pos_embed == "reinit":
        new["backbone"]["pos_embed"] = fresh
    elif pos_embed == "resample":
        from chexfound_jax.models.pos_embed import interpolate_pos_embed

        side = math.isqrt(fresh.shape[1] - 1) * training.model_cfg.backbone.patch_size
        resized = interpolate_pos_embed(
            jnp.asarray(old), side, side, training.model_cfg.backbone.patch_size, prev_cfg.backbone.interpolate_offset
        )
        new["backbone"]["pos_embed"] = np.asarray(resized)
    else:
        raise ConfigError(f"train.init_pos_embed must be 'reinit' or 'resample', got {pos_embed!r}")
    shardings = training.state_shardings
    student = jax.device_put(new, shardings.student)
    teacher = jax.device_put(new, shardings.teacher)
    return state.replace(student=student, teacher=teacher)


def start_state(cfg: Any, training: Training, ckpt: checkpoint.Checkpointer, lead: bool) -> tuple[int, Any, Any]:
    """(first step, state, data-iterator state or None): a fresh (or `init_from`) state, or the newest
    checkpoint that restores whole (a damaged one is named, skipped and kept)."""
    if ckpt.latest_step() is not None:
        start, state, data_state, _ = ckpt.restore_newest(
            abstract_state=training.abstract_state, shardings=training.state_shardings
        )
        logging.info("resumed from step %d in %s", start, ckpt.directory)
        return start, state, data_state
    state = training.init_state()
    if cfg.train.init_from:
        state = init_from(training, state, cfg.train.init_from, cfg.train.init_pos_embed)
    if lead:
        student = training.abstract_state.student
        sizes = ", ".join(f"{name} {count_params(tree):,}" for name, tree in student.items())
        logging.info("student parameters: %s (the table per leaf with --verbosity=1)", sizes)
        logging.vlog(1, "parameters:\n%s", logs.parameter_overview(student))
    return 0, state, None


def online_eval(cfg: Any, training: Training) -> OnlineEval | None:
    """The online evaluation of `eval_online`, or None when it is off."""
    if not cfg.eval_online.every:
        return None
    try:
        return OnlineEval(
            cfg.eval_online, training.model_cfg.backbone, training.mesh, training.rules, cfg.crops.global_crops_size
        )
    except (ValueError, FileNotFoundError) as e:  # a task or dataset that does not fit: one line, not a trace
        raise ConfigError(f"eval_online: {e}") from e


def input_iterator(cfg: Any, training: Training) -> pipeline.DeviceIterator:
    """This process's share of the training batches, placed on the devices as the step expects."""
    crops = training.batch_shardings["global_crops"]
    groups = training.batch_spec["global_crops"].shape[0]
    shard, shards = pipeline.process_data_shard(crops, groups)
    layout = pipeline.train_layout(cfg, batch_shards(training.rules, training.mesh), process_count=shards)
    dataset = pipeline.training_dataset(cfg, layout, process_index=shard)
    # One local batch, made in this process (no worker start-up), tells the keys and ranks to shard.
    probe = next(iter(pipeline.training_dataset(cfg, layout, process_index=shard, num_workers=0)))
    return pipeline.DeviceIterator(
        dataset, pipeline.data_shardings(probe, crops), groups, cfg.data.device_prefetch, cfg.train.stall_timeout_s
    )


class StepLog:
    """What the loop reports at a log point: the step's metrics, throughput and MFU to the writers, and one
    console line (progress, ETA, loss, MFU); a non-finite loss under on_nonfinite="stop" ends the run."""

    def __init__(
        self,
        cfg: Any,
        training: Training,
        devices: Sequence[jax.Device],
        start: int,
        writer: logs.MetricsWriter,
        lead: bool,
    ):
        self.cfg, self.writer, self.lead = cfg, writer, lead
        self.images = cfg.train.global_batch_size
        groups = training.batch_spec["global_crops"].shape[0]
        # MFU counts the FLOPs the step executes (subset drop path skips rows); the nominal count is logged beside it.
        self.step_flops = flops.train_flops_per_image(cfg, self.images // groups)
        self.num_devices = len(devices)
        self.peak = hardware.peak_flops(devices[0].device_kind, cfg.train.peak_flops or None)
        self.progress = Progress(cfg.optim.epochs * cfg.optim.epoch_length, start, images_per_step=self.images)

    def check_finite(self, step: int, values: dict[str, float], ckpt: checkpoint.Checkpointer) -> None:
        if self.cfg.train.on_nonfinite == "stop" and not all(
            math.isfinite(values[k]) for k in ("total_loss", "grad_norm")
        ):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss {values['total_loss']}, grad norm "
                f"{values['grad_norm']}); last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
            )

    def write(self, step: int, values: dict[str, float]) -> dict[str, Any]:
        """Logs a log point's values (plus throughput once a rate exists); returns them with the step."""
        line = self.progress.tick(step)
        step_time = self.progress.interval_step_time_s  # None at the baseline tick: no rate yet
        if step_time:
            values |= flops.throughput_metrics(
                self.images,
                self.step_flops["executed_total"],
                step_time,
                self.num_devices,
                self.peak,
                nominal_flops_per_image=self.step_flops["total"],
            )
        self.writer.write_scalars(step, values)
        if self.lead:
            mfu = f" | MFU {100 * values['mfu']:.1f}%" if "mfu" in values else ""
            logging.info("%s | loss %.4f%s", line, values["total_loss"], mfu)
        return {"step": step, **values}


def train(cfg: Any, workdir: str | epath.Path, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the job to cfg's last step or a preemption; returns the last logged metrics."""
    workdir = epath.Path(workdir)
    devices = list(devices if devices is not None else jax.devices())
    for w in validate(cfg, len(devices)):
        logging.warning("config: %s", w)
    training = build_training(cfg, devices=devices)
    check_mesh(cfg, training)
    lead = jax.process_index() == 0
    total_steps = cfg.optim.epochs * cfg.optim.epoch_length
    writer = logs.MetricsWriter(workdir, enabled=lead)
    writer.write_config(cfg)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.train.checkpoint_every,
        keep_last=cfg.train.keep_last,
        keep_every=cfg.train.keep_every or None,
    )
    it = None
    try:
        start, state, data_state = start_state(cfg, training, ckpt, lead)
        online = online_eval(cfg, training)
        if online is not None and start == 0:
            evaluate_online(online, 0, state, writer, lead)  # the initialisation: where the curves start
        it = input_iterator(cfg, training)
        if data_state is not None:
            it.set_state(data_state)
        finish = jax.jit(lambda b: pipeline.finish_on_device(b, cfg), out_shardings=training.batch_shardings)
        step_fn = guarded_step(training.step, cfg.train.on_nonfinite)
        if cfg.train.on_nonfinite == "skip":
            step_fn = jax.jit(step_fn, donate_argnums=0)
        preemption = Preemption()
        preemption.install()
        log = StepLog(cfg, training, devices, start, writer, lead)
        last: dict[str, Any] = {}
        skipped_total = 0
        step = start
        while step < total_steps:
            if step == cfg.train.profile_start and lead:
                jax.profiler.start_trace(str(workdir / "profile"))
            batch, local = next(it)
            train_batch = finish(batch)
            if step == cfg.debug.inject_nan_at_step:  # fault injection, to exercise the guard below
                train_batch = dict(train_batch, global_crops=train_batch["global_crops"] * jnp.nan)
            state, m = step_fn(state, train_batch)
            if cfg.train.profile_start >= 0 and step == cfg.train.profile_start + cfg.train.profile_steps - 1 and lead:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            step += 1
            skipped_total += int(np.sum(local["skipped"]))
            stop = preemption.requested  # read once: a signal arriving later is handled after the next step
            log_now = step % cfg.train.log_every == 0 or step == total_steps or stop
            if step == start + 1 and not log_now:
                # The run's first step compiled the step function: its end is the timing baseline, so no
                # throughput window includes the compilation (at a log point the log's tick is the baseline).
                jax.block_until_ready(m)
                log.progress.tick(step)
            save_now = ckpt.should_save(step) or step == total_steps or stop
            if log_now or save_now or cfg.train.on_nonfinite == "stop":
                values = {k: float(v) for k, v in jax.device_get(m).items()}
                log.check_finite(step, values, ckpt)
                if log_now:
                    last = log.write(step, values | {"skipped_records": skipped_total})
            if online is not None and online.due(step, total_steps):
                evaluate_online(online, step, state, writer, lead)
            if save_now:
                ckpt.save(step, state, it.get_state(), cfg.to_dict(), force=True)
                if lead:
                    logging.info("checkpoint of step %d in %s", step, ckpt.directory)
            if cfg.train.export_every and (step % cfg.train.export_every == 0 or step == total_steps):
                export(workdir, step, training.model_cfg, state, lead)
            if stop:
                break
    finally:
        ckpt.wait()
        ckpt.close()
        if it is not None:
            it.close()
        writer.close()
    return last


def define_flags() -> None:
    """The program's flags; defined only when run as a program, so importing `train` claims no flag names."""
    config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output and resume directory (local or gs://).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = flags.FLAGS.config
    try:
        distributed.initialize(cfg.distributed)
        train(cfg, flags.FLAGS.workdir)
    except (ConfigError, FloatingPointError) as e:
        raise SystemExit(f"pretrain: {e}") from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
