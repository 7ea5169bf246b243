"""python -m chexfound_jax.pretrain: config errors, checkpoints and exports, exact resume, preemption, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from etils import epath
from helpers import child_env, run_processes

from chexfound_jax import embed, pretrain
from chexfound_jax.data import classification
from chexfound_jax.eval import knn, online, tasks
from chexfound_jax.jobs import checkpoint
from chexfound_jax.models import weights
from chexfound_jax.models.build import model_from_params
from configs.pretrain import tiny_cpu
from data_prep import local_runner, writers
from data_prep import stages as prep
from data_prep.sources import get_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERMANY = os.path.join(REPO, "tests", "data", "kermany")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    source = get_source(
        "folder", KERMANY, csv="labels.csv", path_column="file", label_columns=["label"], source_name="kermany"
    )
    local_runner.run_local(source, out, prep.PrepOptions(size=96, min_size=200), workers=1, progress=False)
    return os.fspath(writers.dataset_dir(out, "kermany", prep.DATASET_VERSION))


def config(dataset, steps=12, **train):
    cfg = tiny_cpu.get_config()
    cfg.data.datasets = (dataset,)
    cfg.optim.update(epochs=1, epoch_length=steps, warmup_epochs=0)
    cfg.teacher.update(warmup_teacher_temp_epochs=0)
    cfg.train.update({"checkpoint_every": 5, "log_every": 1, "export_every": 0, **train})
    return cfg


def test_config_errors_name_the_key(dataset):
    cfg = config(dataset)
    cfg.train.unlock()
    cfg.train.learning_rate = 1.0
    with pytest.raises(pretrain.ConfigError, match=r"unknown config keys: train\.learning_rate"):
        pretrain.validate(cfg, 8)
    cfg = config(dataset)
    cfg.parallel.mesh = {"data": 16, "fsdp": 1}
    with pytest.raises(pretrain.ConfigError, match="needs 16 devices"):
        pretrain.validate(cfg, 8)
    cfg = config(dataset)
    cfg.data.datasets = ()
    with pytest.raises(pretrain.ConfigError, match="data.datasets is empty"):
        pretrain.validate(cfg, 8)
    cfg = config(dataset)
    cfg.crops.global_crops_size = 128
    with pytest.raises(pretrain.ConfigError, match=r"global_crops_size 128 is larger than the images of .* \(96 px\)"):
        pretrain.validate(cfg, 8)
    cfg = config(dataset)
    cfg.eval_online.every = 5
    with pytest.raises(pretrain.ConfigError, match="eval_online.datasets is empty"):
        pretrain.validate(cfg, 8)
    cfg.eval_online.datasets = ("/nonexistent/labelled",)
    with pytest.raises(pretrain.ConfigError, match="eval_online.datasets: /nonexistent/labelled does not exist"):
        pretrain.validate(cfg, 8)
    cfg.eval_online.every = -1
    with pytest.raises(pretrain.ConfigError, match="eval_online.every must be >= 0"):
        pretrain.validate(cfg, 8)
    cfg = config(dataset)
    cfg.train.update(global_batch_size=8, batch_groups=8)
    warnings = pretrain.validate(cfg, 8)
    assert any("global_batch_size 8 is small" in w for w in warnings)
    assert any("KoLeo with one image per group" in w for w in warnings)
    cfg = config(dataset)
    cfg.train.update(global_batch_size=12, batch_groups=3)
    with pytest.raises((pretrain.ConfigError, ValueError), match="batch_groups=3"):
        training = pretrain.build_training(cfg, {"data": 8}, "data_parallel")
        pretrain.check_mesh(cfg, training)


def jsonl(workdir) -> list[dict]:
    return [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_writes_checkpoints_metrics_and_exports(dataset, tmp_path):
    cfg = config(dataset, steps=12, export_every=12, profile_start=3, profile_steps=2)
    cfg.eval_online.update(every=8, datasets=(dataset,), batch_size=6)
    # LayerScale 1e-5 leaves every image's class token all but equal for the first steps (feature_std ~1e-7):
    # kNN scores would then be decided by rounding. 0.1 makes the features distinct for the comparison.
    cfg.model.layerscale_init = 0.1
    for split in cfg.eval_online.task.splits.values():
        split.holdout = (0.5, 0.5)
    last = pretrain.train(cfg, tmp_path, devices=jax.devices()[:2])
    rows = [r for r in jsonl(tmp_path) if "total_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert np.isfinite([r["total_loss"] for r in rows]).all()
    assert last["step"] == 12 and last["total_loss"] == rows[-1]["total_loss"]  # the returned row is the last one
    logged = {"total_loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "param_norm", "update_norm"}
    throughput = {"images_per_s", "tflops_per_s_per_device", "tflops_per_s_per_device_nominal"}
    assert logged | throughput | {"skipped_records"} <= rows[-1].keys()
    # Step 1 compiled the step: it is the timing baseline, so its row has no throughput; step 2's has.
    assert not throughput & rows[0].keys() and throughput <= rows[1].keys()
    # tiny_cpu runs subset drop path: the executed count (MFU's numerator) is below the nominal one.
    assert rows[-1]["tflops_per_s_per_device"] < rows[-1]["tflops_per_s_per_device_nominal"]
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # the profiler trace of steps 3-4
    assert json.loads((tmp_path / "config.json").read_text())["train"]["global_batch_size"] == 16
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=5, keep_last=2, keep_every=None)
    assert ckpt.latest_step() == 12
    ckpt.close()
    export = tmp_path / "export" / "00000012"
    assert (export / "teacher_checkpoint.pth").exists()
    _, teacher = weights.load_weights(export / "teacher")
    _, student = weights.load_weights(export / "student")
    assert teacher["backbone"]["cls_token"].shape == student["backbone"]["cls_token"].shape
    check_online_eval(cfg, tmp_path, export)


def check_online_eval(cfg, workdir, export):
    """The online/* rows: at the initialisation, every 8 steps and at the end, and the last one equal to an
    offline kNN and ridge probe on the exported teacher's class tokens (one device, no mesh)."""
    online_rows = [r for r in jsonl(workdir) if "online/knn_auroc" in r]
    assert [r["step"] for r in online_rows] == [0, 8, 12]
    for r in online_rows:
        assert all(np.isfinite(float(r[f"online/{k}"])) for k in ("knn_auroc", "knn_accuracy", "linear_auroc"))
        assert 0 < float(r["online/feature_std"]) and 1 <= float(r["online/effective_rank"]) <= 64
    vit_cfg, params = weights.load_weights(export / "teacher")
    model = model_from_params(vit_cfg.backbone, params["backbone"])
    split = tasks.load_task(cfg.eval_online.datasets, tasks.task_from_config(cfg.eval_online.task), ("train", "test"))
    feats, labels = {}, {}
    for name, table in split.items():
        records = classification.LabelledRecords(cfg.eval_online.datasets, [table])
        images = np.stack([classification.eval_image(records.image(i), 64) for i in range(len(records))])
        feats[name], labels[name] = embed.embed_arrays(model, images, 4, n_last_blocks=1)["cls_token"], records.labels
    assert len(labels["test"]) >= 8 and set(np.unique(labels["test"])) == {0.0, 1.0}
    scores = knn.knn_scores(feats["train"], labels["train"], feats["test"], (20,))[20]
    offline = {f"knn_{k}": v for k, v in online.macro_scores(labels["test"], scores).items()}
    ridge = online.ridge_probe_scores(feats["train"], labels["train"], feats["test"])
    offline["linear_auroc"] = online.macro_scores(labels["test"], ridge)["auroc"]
    offline |= online.collapse_monitors(feats["test"])
    for key, value in offline.items():
        assert float(online_rows[-1][f"online/{key}"]) == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_restore_from_eight_devices_onto_four_and_continue(dataset, tmp_path):
    pretrain.train(config(dataset, steps=10), tmp_path)
    cfg = config(dataset, steps=12)
    cfg.parallel.mesh = {"data": 4, "fsdp": 1}
    last = pretrain.train(cfg, tmp_path, devices=jax.devices()[:4])
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))  # resumed at 10, nothing repeated
    assert np.isfinite([r["total_loss"] for r in rows]).all()
    assert last["step"] == 12 and last["total_loss"] == rows[-1]["total_loss"]


def test_a_damaged_newest_checkpoint_is_named_kept_and_skipped(dataset, tmp_path, caplog):
    """As a bad disk or an interrupted copy leaves it: the newest checkpoint's array files truncated. The
    rerun resumes from the one before, names the damaged files, and deletes nothing."""
    cfg = config(dataset, steps=6, checkpoint_every=3)
    pretrain.train(cfg, tmp_path, devices=jax.devices()[:2])  # checkpoints at 3 and 6
    ckpts = tmp_path / "checkpoints"
    truncated = [f for f in (ckpts / "6" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert truncated
    for f in truncated:
        os.truncate(f, f.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        last = pretrain.train(config(dataset, steps=8, checkpoint_every=3), tmp_path, devices=jax.devices()[:2])
    assert last["step"] == 8 and np.isfinite(last["total_loss"])
    warning = "\n".join(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "step 6 is damaged" in warning and any(f.name in warning for f in truncated), warning
    aside = ckpts / "6.damaged" / "state"
    assert sorted(f.name for f in aside.rglob("*") if f.parent.name == "d") == sorted(f.name for f in truncated)
    assert {p.name for p in ckpts.iterdir()} >= {"6.damaged", "8"}
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == [*range(1, 7), *range(4, 9)]  # resumed at 3
    # Step 4's loss is computed from step 3's state on step 4's batch, before any update: the resumed run
    # gets the first run's value only if it restored that state and that data position.
    assert rows[6]["total_loss"] == pytest.approx(rows[3]["total_loss"], rel=1e-5), (rows[3], rows[6])


def test_nonfinite_loss_stops_or_skips(dataset, tmp_path):
    cfg = config(dataset, steps=8)
    cfg.debug.inject_nan_at_step = 6  # the 7th step
    with pytest.raises(FloatingPointError, match=r"at step 7 .*last good checkpoint: step 5"):
        pretrain.train(cfg, tmp_path / "stop", devices=jax.devices()[:2])
    cfg.train.on_nonfinite = "skip"
    last = pretrain.train(cfg, tmp_path / "skip", devices=jax.devices()[:2])
    rows = jsonl(tmp_path / "skip")
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 0, 0, 0, 0, 1, 0]
    assert last["step"] == 8 and np.isfinite(last["total_loss"]) and last["total_loss"] == rows[-1]["total_loss"]
    # Up to the injected NaN the two runs are the same run: the policy changes nothing before it acts.
    stopped = [r["total_loss"] for r in jsonl(tmp_path / "stop") if "total_loss" in r]
    assert stopped[:6] == [r["total_loss"] for r in rows[:6]], (stopped, rows)


def test_a_skipped_step_keeps_the_schedules_on_the_step_count():
    """As the official loop: lr and weight decay are read at the iteration, while the skipped update moves
    neither the parameters nor Adam (its moments and bias-correction count, as a GradScaler-skipped step)."""
    import jax.numpy as jnp
    import optax

    from chexfound_jax.train.state import TrainState

    lr = lambda count: -0.1 * (count + 1.0)
    opt = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(lambda c: 0.01 * c), optax.scale_by_schedule(lr))
    params = {"w": jnp.ones(3)}

    def step_fn(state, grad):
        updates, opt_state = opt.update({"w": grad}, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        new = state.replace(step=state.step + 1, student=student, opt_state=opt_state)
        return new, {"total_loss": grad.sum(), "grad_norm": jnp.linalg.norm(grad)}

    opt_state = opt.init(params)
    state = TrainState(step=jnp.int32(0), student=params, teacher=params, opt_state=opt_state, rng=None, centers={})
    step = jax.jit(pretrain.guarded_step(step_fn, "skip"))
    one, _ = step(state, jnp.ones(3))
    two, m = step(one, jnp.full(3, jnp.nan))
    assert int(m["skipped_nonfinite"]) == 1 and int(two.step) == 2
    np.testing.assert_array_equal(two.student["w"], one.student["w"])
    adam, decay, schedule = two.opt_state
    assert int(adam.count) == 1 and int(decay.count) == 2 and int(schedule.count) == 2
    np.testing.assert_array_equal(adam.mu["w"], one.opt_state[0].mu["w"])
    three, _ = step(two, jnp.ones(3))
    adam_update = 1.0 / (1.0 + 1e-8)  # the same gradient again: Adam's normalised step is 1 per coordinate
    want = one.student["w"] + lr(2) * (adam_update + 0.01 * 2 * one.student["w"])  # the schedules at step 2
    np.testing.assert_allclose(three.student["w"], want, rtol=1e-4)  # float32 bias corrections; lr(1) would be 30% off


def cli(dataset, workdir, steps):
    return [
        sys.executable, "-m", "chexfound_jax.pretrain", "--config=configs/pretrain/tiny_cpu.py", f"--workdir={workdir}",
        f"--config.data.datasets=('{dataset}',)", "--config.optim.epochs=1", f"--config.optim.epoch_length={steps}",
        "--config.optim.warmup_epochs=0", "--config.teacher.warmup_teacher_temp_epochs=0",
        "--config.train.checkpoint_every=4", "--config.train.log_every=1", "--config.train.export_every=100",
    ]  # fmt: skip


def final_student(workdir, step) -> dict:
    return weights.load_weights(epath.Path(workdir) / "export" / f"{step:08d}" / "student")[1]


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def test_sigterm_checkpoints_and_sigkill_resumes_bitwise(dataset, tmp_path):
    env = child_env()  # one CPU device in every run, so all runs compute the same numbers
    steps = 14
    # the uninterrupted reference runs alongside the interrupted runs (one CPU device each)
    reference = subprocess.Popen(
        cli(dataset, tmp_path / "ref", steps),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    work = tmp_path / "run"
    metrics_file = work / "metrics.jsonl"
    proc = subprocess.Popen(cli(dataset, work, steps), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = jsonl(work)[-1]["step"]
    assert stopped < steps
    ckpt = checkpoint.Checkpointer(work / "checkpoints", save_every=4, keep_last=2, keep_every=None)
    assert ckpt.latest_step() == stopped  # a checkpoint at the step it stopped, not the last periodic one
    ckpt.close()

    proc = subprocess.Popen(cli(dataset, work, steps), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    ckpts = work / "checkpoints"
    later = lambda: any(p.name.isdigit() and int(p.name) >= 8 and int(p.name) > stopped for p in ckpts.iterdir())
    assert wait_for(later, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    rerun = subprocess.run(cli(dataset, work, steps), cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    want, got = final_student(tmp_path / "ref", steps), final_student(work, steps)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # bitwise: nothing lost, nothing repeated


def test_two_processes_train_and_checkpoint(dataset, tmp_path):
    """The CLI as a 2-host job: jax.distributed on localhost, 4 simulated CPU devices per process."""
    port = portpicker.pick_unused_port()
    env = child_env(devices=4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    commands = [
        [
            *cli(dataset, tmp_path, 6),
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            "--config.distributed.initialize=always",
            "--config.train.checkpoint_every=3",
            "--config.eval_online.every=3",  # the online evaluation embeds on both processes' devices
            f"--config.eval_online.datasets=('{dataset}',)",
        ]
        for i in range(2)
    ]
    run_processes(commands, env, cwd=REPO)
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows if "total_loss" in r] == list(range(1, 7))  # written once, by process 0
    online_rows = [r for r in rows if "online/feature_std" in r]
    assert [r["step"] for r in online_rows] == [0, 3, 6]
    assert all(float(r["online/feature_std"]) > 0 for r in online_rows)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert (tmp_path / "export" / "00000006" / "teacher_checkpoint.pth").exists()
