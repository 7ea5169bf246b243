"""Evaluation workflows end to end on a learnable task made from real X-rays, with a shuffled-label control.

The backbone is the golden tiny CheXFound teacher (.pth, read as the released weights would be); the
task is two faint patterns pasted into real chest X-rays (tests/synthetic.py). A GLoRI probe must learn
it (test AUROC > 0.95) while the same probe on shuffled labels stays at chance.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import synthetic
from etils import epath
from helpers import TINY_HEADS, TINY_TEACHER, child_env, run_processes
from PIL import Image

from chexfound_jax import embed, evaluate
from chexfound_jax.convert.backbone import load_backbone
from chexfound_jax.models import classifiers
from chexfound_jax.models.build import model_from_params
from configs.eval import tiny_cpu

pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"train": 160, "val": 40, "test": 80}


def _synthetic_config_file(path: pathlib.Path, shard_dir, *lines: str) -> pathlib.Path:
    """A config file: tiny_cpu on the synthetic task's shards, then `lines` (statements on `c`)."""
    statements = (f"c.task = {synthetic.task_config()!r}", f"c.data.datasets = ({os.fspath(shard_dir)!r},)", *lines)
    header = "from configs.eval import tiny_cpu\ndef get_config():\n    c = tiny_cpu.get_config()\n"
    path.write_text(header + "".join(f"    {line}\n" for line in statements) + "    return c\n")
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    real = synthetic.build_shards(synthetic.write_release(root / "real", COUNTS), root / "out", name="synthetic")
    control = synthetic.build_shards(
        synthetic.write_release(root / "control", COUNTS, shuffle_labels=True), root / "out", name="control"
    )
    return {"real": real, "control": control}


def config(dataset, **changes):
    c = tiny_cpu.get_config()
    c.data.datasets = (os.fspath(dataset),)
    c.task = synthetic.task_config()
    c.backbone.num_heads = TINY_HEADS
    # the pattern's place is the class cue: no flips or crops, so a short run can learn it
    c.data.update(train_scale=(1.0, 1.0), flip_p=0.0)
    c.train.update(lrs=(1e-3, 3e-3), val_epochs=25, epochs=25, eval_period_epochs=10)
    c.update_from_flattened_dict(changes)
    return c


@pytest.fixture(scope="module")
def glori_run(shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("glori")
    return workdir, evaluate.evaluate(config(shards["real"]), os.fspath(TINY_TEACHER), workdir)


def test_glori_probe_learns_the_pattern_task(glori_run):
    _, results = glori_run
    for name in synthetic.CLASSES:
        assert results["classes"][name]["auroc"] > 0.95, results["classes"][name]
    assert results["macro"]["auroc"] > 0.95
    lo, hi = results["macro"]["auroc_ci"]
    assert lo <= results["macro"]["auroc"] <= hi
    assert results["splits"] == COUNTS


def test_shuffled_labels_stay_at_chance(shards, tmp_path):
    # the same probe (phase 1 and test; no refit to keep it short) on the same images with permuted labels
    cfg = config(shards["control"], **{"report.plots": False, "refit.enabled": False})
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert abs(results["macro"]["auroc"] - 0.5) < 0.15, results["macro"]
    lo, hi = results["macro"]["auroc_ci"]
    assert lo < 0.5 < hi


def test_probe_outputs_head_reports_predictions_and_overlays(glori_run):
    workdir, results = glori_run
    workdir = epath.Path(workdir)
    cfg, _, meta = classifiers.load_classifier(workdir / "head")
    assert cfg.kind == "glori" and cfg.num_classes == 2 and cfg.cat_cls
    assert meta["class_names"] == list(synthetic.CLASSES) and meta["lr"] == results["lr"]
    training = json.loads((workdir / "training.json").read_text())
    assert training["phase1"]["best_lr"] == results["lr"] and "phase2" in training
    assert training["phase2"]["images"] == COUNTS["train"] + COUNTS["val"]  # the refit trains on train + val
    logged = (workdir / "metrics.jsonl").read_text()  # and TensorBoard: per-lr losses and validation scores
    for tag in ("probe/phase1/train_loss/lr=0.001", "probe/phase1/val_auroc/lr=0.003", "probe/phase2/train_loss/lr="):
        assert tag in logged, tag
    test = workdir / "test"
    saved = json.loads((test / "results.json").read_text())
    assert saved["macro"]["auroc"] == pytest.approx(results["macro"]["auroc"])
    assert "marker_a" in (test / "report.md").read_text()
    with (test / "predictions.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", *synthetic.CLASSES] and len(rows) == COUNTS["test"] + 1
    pngs = list(pathlib.Path(test).rglob("*.png"))
    assert any("attention" in str(p) for p in pngs) and len(pngs) >= 5
    for p in pngs:
        with Image.open(p) as im:
            im.verify()


def test_linear_probe_cli_and_predict_on_files(shards, tmp_path):
    """The CLI as a user runs it (linear head, no refit), then predict on image files with one bad file."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = [
        sys.executable,
        "-m",
        "chexfound_jax.evaluate",
        "--config=" + os.path.join(REPO, "configs/eval/tiny_cpu.py"),
        f"--checkpoint={TINY_TEACHER}",
        f"--config.backbone.num_heads={TINY_HEADS}",
    ]
    run = subprocess.run(
        [
            *common,
            f"--workdir={tmp_path / 'unknown'}",
            f"--config.data.datasets=('{shards['real']}',)",
            "--config.task.name=synthetic",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode != 0 and "evaluate: " in run.stderr and "synthetic" in run.stderr  # not a registered task
    assert "Traceback" not in run.stderr
    cfg_file = _synthetic_config_file(tmp_path / "linear_cfg.py", shards["real"])
    common[3] = f"--config={cfg_file}"
    run = subprocess.run(
        [*common, f"--workdir={tmp_path / 'linear'}", "--config.head.kind=linear", "--config.refit.enabled=False"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    head = tmp_path / "linear" / "head"
    cfg, _, meta = classifiers.load_classifier(head)
    assert cfg.kind == "linear"
    training = json.loads((tmp_path / "linear" / "training.json").read_text())
    assert "phase2" not in training

    data = epath.Path(REPO) / "tests" / "data"
    images = [
        *sorted((data / "images").glob("*.png")),
        data / "dicom/chest/cxr_cr_pa_mono2_8bit_jpeg_baseline_siim_pneumothorax.dcm",
    ]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    run = subprocess.run(
        [
            *common,
            f"--workdir={tmp_path / 'predict'}",
            "--config.workflow=predict",
            f"--config.predict.head={head}",
            "--config.predict.id_column=dicom_id",
            *map(str, images),
            str(bad),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "predict" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dicom_id", *meta["class_names"]]
    assert [r[0] for r in rows[1:]] == [p.name.rsplit(".", 1)[0] for p in images]
    # By hand: the sigmoid of the head's Linear on the last blocks' CLS tokens, from the same backbone run by
    # chexfound_jax.embed (not the evaluation feeder), on the same preprocessed files.
    vit_cfg, backbone = load_backbone(TINY_TEACHER, TINY_HEADS)
    _, head_params, _ = classifiers.load_classifier(head)
    features = embed.embed_images(
        model_from_params(vit_cfg, backbone), images, image_size=64, n_last_blocks=cfg.n_blocks
    )
    logits = features["last_blocks_cls"].reshape(len(images), -1) @ head_params["linear"]["kernel"]
    want = 1 / (1 + np.exp(-(logits + head_params["linear"]["bias"])))
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # the CSV keeps 6 decimals
    summary = json.loads((tmp_path / "predict" / "predict_summary.json").read_text())
    assert summary == {**summary, "inputs": len(images) + 1, "written": len(images), "failed": 1}
    assert "broken.png" in (tmp_path / "predict" / "predict_failures.csv").read_text()


def test_predict_on_a_split_matches_the_probe_test_predictions(glori_run, shards, tmp_path):
    workdir, _ = glori_run
    cfg = config(shards["real"], workflow="predict")
    cfg.predict.update(head=os.fspath(epath.Path(workdir) / "head"), split="test")
    summary = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert summary["written"] == COUNTS["test"] and summary["failed"] == 0
    with open(tmp_path / "predictions.csv") as f:
        got = list(csv.reader(f))
    with open(epath.Path(workdir) / "test" / "predictions.csv") as f:
        want = list(csv.reader(f))
    assert [r[0] for r in got] == [r[0] for r in want]
    np.testing.assert_allclose(
        np.asarray([r[1:] for r in got[1:]], float), np.asarray([r[1:] for r in want[1:]], float), atol=2e-6
    )


def test_a_head_without_class_names_takes_the_tasks(glori_run, shards, tmp_path):
    """A head converted from PyTorch names no classes: predict labels its columns with the task's names."""
    cfg_, state, meta = classifiers.load_classifier(epath.Path(glori_run[0]) / "head")
    meta.pop("class_names")
    classifiers.save_classifier(tmp_path / "head", cfg_, state, meta)
    cfg = config(shards["real"], workflow="predict")
    cfg.predict.update(head=os.fspath(tmp_path / "head"), split="test")
    assert evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "named")["classes"] == list(synthetic.CLASSES)
    cfg.task = {**synthetic.task_config(), "class_names": ["marker_b"]}  # 1 class for a 2-class head
    assert evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "unnamed")["classes"] == ["class_0", "class_1"]


def test_out_of_distribution_evaluation_uses_the_shared_classes(glori_run, shards, tmp_path):
    workdir, _ = glori_run
    cfg = config(shards["control"], workflow="ood")
    cfg.task = {**synthetic.task_config(), "class_names": ["marker_b"]}
    cfg.ood.head = os.fspath(epath.Path(workdir) / "head")
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    assert list(results["classes"]) == ["marker_b"]
    assert abs(results["macro"]["auroc"] - 0.5) < 0.2  # shuffled labels: the head's real skill does not transfer
    assert (tmp_path / "results.json").exists()
    cfg.task = {**synthetic.task_config(), "class_names": ["nodule"], "label_columns": ["marker_b"]}
    with pytest.raises(ValueError, match="share no class"):
        evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "none")


def test_label_efficiency_trains_on_subsets_only(shards, tmp_path):
    cfg = config(shards["real"], workflow="label_efficiency", **{"report.plots": False, "metrics.n_bootstrap": 0})
    cfg.label_efficiency.update(fractions=(0.25, 1.0), repeats=2, seed=3)
    cfg.train.update(val_epochs=2, lrs=(1e-2,))
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path)
    runs = results["runs"]
    assert [(r["fraction"], r["repeat"]) for r in runs] == [(0.25, 0), (0.25, 1), (1.0, 0)]
    small = [r["train_images"] for r in runs if r["fraction"] == 0.25]
    assert all(35 <= n <= 45 for n in small)  # ~ a quarter of 160, whole patients
    assert [r["train_images"] for r in runs if r["fraction"] == 1.0] == [COUNTS["train"]]  # val never added
    saved = json.loads((tmp_path / "label_efficiency.json").read_text())
    assert [s["fraction"] for s in saved["summary"]] == [0.25, 1.0]
    assert "0.25" in (tmp_path / "label_efficiency.md").read_text()


def test_two_view_linear_probe_reads_the_second_view(tmp_path):
    """PA rows whose labels show only in their study's lateral: a two-view probe reads them, and predict
    pairs the views the same way."""
    release = synthetic.write_two_view_release(tmp_path / "release", COUNTS, amplitude=60.0)
    dataset = synthetic.build_shards(release, tmp_path / "shards", name="two_view")
    cfg = config(dataset, **{"head.kind": "linear", "head.avgpool": True, "refit.enabled": False})
    cfg.task = {**synthetic.task_config(), "views": ("PA",), "multiview": True}
    cfg.train.update(lrs=(1e-2, 1e-1))
    cfg.report.plots = False
    results = evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "probe")
    assert results["splits"]["test"] == COUNTS["test"]  # the PA images only
    assert results["macro"]["auroc_ci"][0] > 0.6  # the PA images carry no pattern: only the lateral can tell
    head = tmp_path / "probe" / "head"
    assert classifiers.load_classifier(head)[0].views == 2

    cfg.workflow = "predict"
    cfg.predict.update(head=os.fspath(head), split="test")
    evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "predict")
    with open(tmp_path / "predict" / "predictions.csv") as f:
        got = {r[0]: r[1:] for r in csv.reader(f)}
    with open(tmp_path / "probe" / "test" / "predictions.csv") as f:
        want = list(csv.reader(f))
    assert len(got) == 2 * COUNTS["test"] + 1  # predict reads every image of the split, laterals too
    same_rows = np.asarray([got[r[0]] for r in want[1:]], float)
    np.testing.assert_allclose(same_rows, np.asarray([r[1:] for r in want[1:]], float), atol=2e-6)
    with pytest.raises(ValueError, match="predict its inputs from shards"):
        evaluate.evaluate(
            cfg, os.fspath(TINY_TEACHER), tmp_path / "files", images=[str(release / "images" / "s0000_pa.png")]
        )
    cfg.workflow, cfg.head.kind = "probe", "glori"
    with pytest.raises(ValueError, match="only head.kind='linear' reads"):
        evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "glori")


def test_config_errors_are_clear(shards, tmp_path):
    with pytest.raises(ValueError, match="datasets is empty"):
        evaluate.evaluate(config(shards["real"], **{"data.datasets": ()}), os.fspath(TINY_TEACHER), tmp_path)
    with pytest.raises(ValueError, match="workflow"):
        evaluate.evaluate(config(shards["real"], workflow="finetune"), os.fspath(TINY_TEACHER), tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluate.evaluate(config(shards["real"]), os.fspath(tmp_path / "missing.pth"), tmp_path)


def test_two_processes_probe_and_gather_predictions_in_row_order(shards, tmp_path):
    """The CLI as a 2-host job (jax.distributed on localhost, 4 CPU devices each): the probe trains on
    the joint mesh, process 0 writes, and the gathered test predictions are those of the saved head."""
    import portpicker

    cfg_file = _synthetic_config_file(
        tmp_path / "two_process_cfg.py",
        shards["real"],
        f"c.backbone.num_heads = {TINY_HEADS}",
        "c.train.update(val_epochs=1, epochs=1, eval_period_epochs=1)",
        "c.metrics.n_bootstrap = 10",
    )
    port = portpicker.pick_unused_port()
    env = child_env(devices=4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    work = tmp_path / "run"
    commands = [
        [
            sys.executable,
            "-m",
            "chexfound_jax.evaluate",
            f"--config={cfg_file}",
            f"--checkpoint={TINY_TEACHER}",
            f"--workdir={work}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            "--config.distributed.initialize=always",
        ]
        for i in range(2)
    ]
    run_processes(commands, env, cwd=REPO)
    results = json.loads((work / "test" / "results.json").read_text())
    assert results["splits"] == COUNTS and results["n_images"] == COUNTS["test"]
    with open(work / "test" / "predictions.csv") as f:
        two_process = list(csv.reader(f))

    cfg = config(shards["real"], workflow="predict")
    cfg.predict.update(head=os.fspath(work / "head"), split="test")
    evaluate.evaluate(cfg, os.fspath(TINY_TEACHER), tmp_path / "predict")
    with open(tmp_path / "predict" / "predictions.csv") as f:
        one_process = list(csv.reader(f))
    assert [r[0] for r in two_process] == [r[0] for r in one_process]
    np.testing.assert_allclose(
        np.asarray([r[1:] for r in two_process[1:]], float), np.asarray([r[1:] for r in one_process[1:]], float),
        atol=2e-6,
    )  # fmt: skip
