"""chexfound_jax/experiments/miniature.py end to end on 40 bundled X-rays and a tiny config: the patient split,
pretraining on the pool only, the probe arms, results.json and report.md, and a rerun that resumes."""

import csv
import json
import shutil

import jax
import pytest
from etils import epath
from sklearn.metrics import roc_auc_score

from chexfound_jax.experiments import head_probe, miniature
from configs.pretrain import tiny_cpu

BUNDLED = miniature.DEFAULT_DATA


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The first 20 NORMAL and first 20 PNEUMONIA rows of the bundled set."""
    out = tmp_path_factory.mktemp("xrays")
    rows = list(csv.DictReader((BUNDLED / "labels.csv").open()))
    rows = [r for r in rows if r["label"] == "0"][:20] + [r for r in rows if r["label"] == "1"][:20]
    (out / "images").mkdir()
    for r in rows:
        shutil.copy(BUNDLED / r["file"], out / r["file"])
    with (out / "labels.csv").open("w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return epath.Path(out)


def config():
    cfg = tiny_cpu.get_config()
    cfg.optim.update(epochs=1, epoch_length=4, warmup_epochs=0)
    cfg.teacher.update(warmup_teacher_temp_epochs=0)
    cfg.train.update(export_every=2, checkpoint_every=2, log_every=1)
    cfg.eval_online.update(every=2, batch_size=8)
    return cfg


def test_miniature_runs_end_to_end_and_resumes(data, tmp_path):
    glori = head_probe.HeadProbe(
        lrs=(1e-3, 1e-2), epochs=2, batch_size=8, n_last_blocks=2, decoder_dim=16, num_heads=2, ffn_dim=32
    )
    protocol = miniature.Protocol(n_bootstrap=50, supervised_steps=3, supervised_batch=4, glori=glori)
    results = miniature.run(config(), tmp_path, data, protocol, devices=jax.devices()[:1])  # one: compiles faster

    split = list(csv.DictReader((tmp_path / "labels_split.csv").open()))
    pool = {r["patient_id"] for r in split if r["split"] == "train"}
    test = {r["patient_id"] for r in split if r["split"] == "test"}
    assert pool and test and not pool & test  # patient-level: no child on both sides
    assert results["n_pool"] + results["n_test"] == 40 and results["n_test"] == sum(r["split"] == "test" for r in split)
    manifest = json.loads((tmp_path / "shards" / "miniature" / "1.0.0" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["written"] == results["n_pool"]  # pretraining reads the pool only

    assert set(results["arms"]) == {"random_init", "teacher_2", "teacher_4", "supervised", "image_statistics"}
    assert len(results["arms"]["supervised"]["train_loss"]) == 3
    with_glori = {name for name, arm in results["arms"].items() if "glori" in arm}
    assert with_glori == {"random_init", "teacher_4", "supervised"}  # random init, the last teacher, supervised
    for arm in results["arms"].values():
        for name in ("linear", "linear_std", "glori"):
            if name not in arm:
                continue
            probe = arm[name]
            assert probe["C"] in miniature.OFFICIAL_C_GRID if name != "glori" else probe["lr"] in glori.lrs
            lo, hi = probe["test_auroc_ci"]
            assert len(probe["scores"]) == results["n_test"] == len(results["test_labels"])
            # The reported AUROC is that of the stored test scores, and its bootstrap interval holds it.
            assert probe["test_auroc"] == pytest.approx(roc_auc_score(results["test_labels"], probe["scores"]))
            assert lo <= probe["test_auroc"] <= hi
            same = results["arms"]["random_init"][name]["vs_random_init"]
            assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    assert [r["step"] for r in results["knn_curve"]] == [0, 2, 4]

    report = (tmp_path / "report.md").read_text()
    assert report.count("| teacher_4 | 4 |") == 3 and report.count("| teacher_2 | 2 |") == 2  # GLoRI: the last one
    assert "### GLoRI probe" in report and "![online.png](online.png)" in report
    for png in ("losses.png", "teacher_entropy.png", "online.png", "roc.png", "crops.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = (tmp_path / "pretrain" / "metrics.jsonl").read_text()
    # Everything is there: nothing is redone.
    again = miniature.run(config(), tmp_path, data, protocol, devices=jax.devices()[:1])
    assert (tmp_path / "pretrain" / "metrics.jsonl").read_text() == logged  # no step trained twice
    assert again["arms"]["teacher_4"]["linear"] == results["arms"]["teacher_4"]["linear"]
