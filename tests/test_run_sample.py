"""The README's main job on the bundled sample data."""

import csv
import json

import numpy as np
import pytest
from etils import epath
from helpers import DATA, golden
from sklearn.metrics import roc_auc_score

from chexfound_jax import run_sample


def test_sample_run_embeds_and_round_trips(tmp_path):
    features = run_sample.run(epath.Path(tmp_path), DATA)  # raises if the exported file differs
    assert [p.rsplit("/", 1)[-1] for p in features["paths"]] == [
        "cxr_png_gray8_512_nih_cxr14_00000001_000.png",
        "cxr_png_gray8_512_nih_cxr14_00027426_000.png",
    ]
    gold = golden("backbone")
    np.testing.assert_allclose(features["cls_token"][0], gold["img512_x_norm_clstoken"][0], rtol=1e-5, atol=1e-5)
    for name in ("weights/model_config.json", "features.npz", "teacher_checkpoint.pth"):
        assert (tmp_path / name).exists(), name


def test_pretrain_chain_exports_a_teacher_that_embeds_and_evaluates(tmp_path):
    from chexfound_jax.models import weights

    out = run_sample.pretrain_chain(epath.Path(tmp_path), DATA, steps=6)
    assert out["cls_token"].shape == (1, 64)
    logged = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["total_loss"]) for r in logged if "total_loss" in r]
    assert losses[-1][0] == 6 and np.isfinite([v for _, v in losses]).all()
    assert losses[-1][1] == pytest.approx(float(out["loss"]))  # the returned loss is the last step's
    assert (tmp_path / "shards" / "kermany" / "1.0.0" / "manifest.json").exists()
    # The .pth the run exported carries exactly the teacher it saved as JAX weights.
    export = tmp_path / "pretrain" / "export" / "00000006"
    _, teacher = weights.load_weights(export / "teacher")
    from chexfound_jax.convert import import_state_dict, torch_io

    _, imported = import_state_dict(torch_io.read_checkpoint(export / "teacher_checkpoint.pth"), num_heads=4)
    np.testing.assert_array_equal(imported["backbone"]["cls_token"], teacher["backbone"]["cls_token"])
    np.testing.assert_array_equal(imported["dino_head"]["last_layer"]["v"], teacher["dino_head"]["last_layer"]["v"])

    # 7/7: a GLoRI probe of that teacher on the sample pneumonia labels, reports and all
    results = run_sample.evaluate_chain(epath.Path(tmp_path), steps=6, epochs=2)
    assert sum(results["splits"].values()) == 24 and min(results["splits"].values()) >= 6
    # The reported AUROC is the test split's: recompute it from the written predictions and the sample's labels.
    with open(DATA / "kermany" / "labels.csv", newline="") as f:
        label_of = {r["file"].rsplit(".", 1)[0]: int(r["label"]) for r in csv.DictReader(f)}
    with (tmp_path / "evaluate" / "test" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == results["splits"]["test"]
    y = np.array([label_of[r["image_id"]] for r in rows])
    p = np.array([float(r["Pneumonia"]) for r in rows])  # rounded to 6 decimals
    # Rounding keeps the order except where it makes a positive and a negative equal: each such pair
    # moves the AUROC by at most half a pair's share.
    ties = np.sum(p[y == 1][:, None] == p[y == 0][None, :]) / (np.sum(y == 1) * np.sum(y == 0))
    assert abs(results["macro"]["auroc"] - roc_auc_score(y, p)) <= ties / 2 + 1e-12, (results["macro"], ties)
    assert results["classes"]["Pneumonia"]["auroc"] == results["macro"]["auroc"]
    for name in ("head/classifier_config.json", "test/results.json", "test/report.md", "test/predictions.csv"):
        assert (tmp_path / "evaluate" / name).exists(), name


def test_a_previous_run_is_refused_up_front_or_replaced_with_overwrite(tmp_path):
    workdir = epath.Path(tmp_path)
    run_sample.prepare_workdir(workdir)  # empty: fine
    (tmp_path / "weights" / "params").mkdir(parents=True)
    (tmp_path / "features.npz").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(FileExistsError, match=r"previous sample run \(weights, features.npz\).*--overwrite"):
        run_sample.prepare_workdir(workdir)
    assert (tmp_path / "features.npz").read_bytes() == b"old"  # nothing removed without --overwrite
    run_sample.prepare_workdir(workdir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own outputs go
