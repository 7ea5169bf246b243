"""Reports (JSON, Markdown, PNG plots) and GLoRI attention heat maps / overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from chexfound_jax.eval import metrics, reports

NAMES = ["Atelectasis", "Pleural Effusion", "Round(ed) Atelectasis", "Hernia"]


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(0)
    labels = (rng.random((80, 4)) < 0.3).astype(np.float64)
    probs = np.clip(0.3 * labels + 0.7 * rng.random((80, 4)), 0, 1)
    labels[:6, 1] = np.nan
    labels[6:9, 2] = -1.0
    labels[:, 3] = 0.0  # Hernia: no positive -> undefined
    results = metrics.classification_metrics(labels, probs, NAMES, n_bootstrap=50, seed=0)
    return labels, probs, results


# ------------------------------------------------------------------------------------------- JSON


def test_write_json_converts_and_sorts(tmp_path):
    obj = {
        "b": np.float32(0.5),
        "a": [np.nan, float("inf"), -np.inf, np.int64(3), np.bool_(True)],
        "c": {"arr": np.arange(3), "nested": np.array([[1.5, np.nan]])},
        2: "int key",
    }
    path = tmp_path / "sub" / "x.json"
    reports.write_json(path, obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "2": "int key",
        "a": [None, None, None, 3, True],
        "b": 0.5,
        "c": {"arr": [0, 1, 2], "nested": [[1.5, None]]},
    }
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_write_json_names_the_bad_key(tmp_path):
    with pytest.raises(TypeError, match=r"<root>\.outer\.inner"):
        reports.write_json(tmp_path / "x.json", {"outer": {"inner": object()}})


# --------------------------------------------------------------------------------------- Markdown


def test_markdown_summary_rows(evaluation):
    _, _, results = evaluation
    results = {**results, "task": "cxrlt", "checkpoint": "ckpt_100", "lr": 1e-4}
    text = reports.markdown_summary(results, title="GLoRI on CXR-LT")
    lines = text.splitlines()
    assert lines[0] == "# GLoRI on CXR-LT"
    for info in ("- **task**: cxrlt", "- **checkpoint**: ckpt_100", "- **lr**: 0.0001", "- **n_images**: 80"):
        assert info in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| class")]
    assert rows[0].startswith("| **macro** (3 classes)")
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == NAMES
    m = results["macro"]
    assert f"{m['auroc']:.4f} [{m['auroc_ci'][0]:.4f}, {m['auroc_ci'][1]:.4f}]" in rows[0]
    ate = results["classes"]["Atelectasis"]
    assert rows[1] == (
        f"| Atelectasis | {ate['auroc']:.4f} [{ate['auroc_ci'][0]:.4f}, {ate['auroc_ci'][1]:.4f}] "
        f"| {ate['ap']:.4f} [{ate['ap_ci'][0]:.4f}, {ate['ap_ci'][1]:.4f}] | {ate['positives']} | {ate['negatives']} |"
    )
    assert rows[4] == "| Hernia | n/a | n/a | 0 | 80 |"
    assert "AUROC [95% CI]" in text and "Hernia." in text


def test_markdown_without_bootstrap():
    results = metrics.binary_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.4, 0.3]), n_bootstrap=0)
    text = reports.markdown_summary(results, title="t")
    assert "| positive | 0.7500 | 0.8333 | 2 | 2 |" in text
    assert "none (no confidence intervals)" in text


# ------------------------------------------------------------------------------------------ plots


def test_safe_names():
    assert reports.safe_name("Pleural Effusion") == "pleural_effusion"
    assert reports.safe_name("Round(ed) Atelectasis") == "rounded_atelectasis"
    assert reports.safe_name("Calcification of the Aorta") == "calcification_of_the_aorta"
    assert reports.safe_name(" ../etc/passwd ") == "etc_passwd"
    assert reports.safe_name("???") == "class"
    assert reports._safe_names(["A b", "a-b", "a_b"]) == ["a_b", "a_b_2", "a_b_3"]


def _png(path, min_side=100):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert min(im.size) >= min_side and max(im.size) <= 4000
        return im.size, np.asarray(im.convert("RGB"))


def test_write_report_files(tmp_path, evaluation):
    labels, probs, results = evaluation
    out = reports.write_report(
        tmp_path / "report", results, labels=labels, probs=probs, class_names=NAMES, title="GLoRI"
    )
    assert set(out) == {"json", "markdown", "bar", "curves_dir"}
    loaded = json.loads((tmp_path / "report" / "results.json").read_text())
    assert loaded["classes"]["Hernia"]["auroc"] is None and loaded["classes"]["Hernia"]["auroc_ci"] == [None, None]
    assert loaded["classes"]["Atelectasis"]["auroc"] == pytest.approx(results["classes"]["Atelectasis"]["auroc"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in NAMES)
    assert "auroc_bar.png" in markdown
    _png(out["bar"])
    curves = tmp_path / "report" / "curves"
    for kind in ("roc", "pr"):
        files = sorted(p.name for p in (curves / kind).iterdir())
        assert files == ["atelectasis.png", "pleural_effusion.png", "rounded_atelectasis.png"]  # Hernia skipped
        for name in files:
            _png(curves / kind / name)


def test_write_report_without_plots(tmp_path, evaluation):
    _, _, results = evaluation
    out = reports.write_report(tmp_path, results, title="t", plots=False)
    assert set(out) == {"json", "markdown"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    with pytest.raises(ValueError, match="labels and probs"):
        reports.write_report(tmp_path, results, title="t")


def test_plot_roc_pr_skips_undefined_and_checks_shapes(tmp_path):
    labels = np.array([[1, 0], [0, 0], [1, np.nan], [0, -1]], dtype=np.float64)
    written = reports.plot_roc_pr(tmp_path, labels, np.full((4, 2), 0.3), ["Edema", "Hernia"])
    assert [str(p.relative_to(tmp_path)) for p in written] == ["roc/edema.png", "pr/edema.png"]
    with pytest.raises(ValueError, match="do not match"):
        reports.plot_roc_pr(tmp_path, labels, np.zeros((4, 3)), ["Edema", "Hernia"])


def test_auroc_bar_sizes(tmp_path, evaluation):
    _, _, results = evaluation
    (w, h), _ = _png(reports.plot_auroc_bar(tmp_path / "bar.png", results))
    empty = {"classes": {"Hernia": results["classes"]["Hernia"]}, "macro": {"auroc": float("nan")}}
    (w0, h0), _ = _png(reports.plot_auroc_bar(tmp_path / "empty.png", empty))
    assert w == w0 and h > h0  # one row per defined class


# --------------------------------------------------------------------------------- attention maps


@pytest.mark.torch
@pytest.mark.parametrize(("heads", "grid", "upsample"), [(8, (32, 32), 16), (3, (3, 5), 4), (2, (1, 4), 3)])
def test_heatmap_matches_torch_bilinear(heads, grid, upsample):
    import torch

    rng = np.random.default_rng(1)
    att = rng.random((heads, grid[0] * grid[1]), dtype=np.float32)
    att /= att.sum(axis=1, keepdims=True)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(att).reshape(1, heads, *grid), scale_factor=upsample, mode="bilinear", align_corners=False
    )[0]
    for gamma in (0.5, 1.0):
        ref = (up.mean(dim=0) ** gamma).numpy()
        got = reports.attention_heatmap(att, grid, upsample=upsample, gamma=gamma)
        assert got.dtype == np.float32 and got.shape == (grid[0] * upsample, grid[1] * upsample)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_heatmap_head_mean_and_gamma():
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 4 * 6))
    one = reports.attention_heatmap(a[None], (4, 6), upsample=2, gamma=1.0)
    two = reports.attention_heatmap(np.stack([a, b]), (4, 6), upsample=2, gamma=1.0)
    other = reports.attention_heatmap(b, (4, 6), upsample=2, gamma=1.0)
    np.testing.assert_allclose(two, (one + other) / 2, rtol=1e-6)
    np.testing.assert_allclose(reports.attention_heatmap(np.stack([a, b]), (4, 6), upsample=2), np.sqrt(two), rtol=1e-6)
    # upsample 1 is the identity resize; a constant map stays constant; the corner pixel copies the corner token
    np.testing.assert_allclose(reports.attention_heatmap(a, (4, 6), upsample=1, gamma=1.0), a.reshape(4, 6), rtol=1e-6)
    np.testing.assert_allclose(reports.attention_heatmap(np.full(6, 0.25), (2, 3), upsample=5), 0.5, rtol=1e-6)
    assert one[0, 0] == pytest.approx(a[0])
    with pytest.raises(ValueError, match="expected"):
        reports.attention_heatmap(a, (5, 5))


def test_overlay_colours():
    image = np.full((2, 3), 100, np.uint8)
    heat = np.array([[0.0, 0.5, 1.0], [0.0, 0.25, 2.0]])
    out = reports.overlay(image, heat)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # no heat: image untouched
    np.testing.assert_array_equal(out[1, 2], [0, 128, 0])  # the maximum: solid green
    # h = 0.5 after max-normalisation (1.0 / 2.0): colour (0.5 white + 0.5 green), opacity 0.5
    colour = 0.5 * np.array([255, 255, 255]) + 0.5 * np.array([0, 128, 0])
    np.testing.assert_array_equal(out[0, 2], np.rint(0.5 * 100 + 0.5 * colour))
    rgb = np.stack([image, image + 1, image + 2], axis=-1)
    np.testing.assert_array_equal(reports.overlay(rgb, np.zeros((2, 3))), rgb)  # zero heat map: unchanged
    with pytest.raises(ValueError, match="uint8"):
        reports.overlay(image.astype(np.float32), heat)
    with pytest.raises(ValueError, match="heatmap"):
        reports.overlay(image, heat[:, :2])


def test_save_attention_overlays(tmp_path):
    rng = np.random.default_rng(3)
    grid = (4, 4)
    image = (rng.random((128, 128)) * 255).astype(np.uint8)
    attention = rng.random((2, len(NAMES), 16))
    written = reports.save_attention_overlays(
        tmp_path,
        image,
        attention,
        grid,
        NAMES,
        classes=["Round(ed) Atelectasis", 0],
        probs=np.array([0.9, 0.1, 0.2, 0.3]),
    )
    assert [p.name for p in written] == ["rounded_atelectasis.png", "atelectasis.png"]
    (w, h), pixels = _png(written[0], min_side=128)
    assert w == 256 and h > 256  # a 128-px image drawn at least 256 px wide, plus a caption band
    assert (pixels[..., 1].astype(int) - pixels[..., 0] > 50).any()  # green attention is drawn
    assert len(reports.save_attention_overlays(tmp_path / "all", image, attention, grid, NAMES)) == len(NAMES)
    with pytest.raises(KeyError, match="Edema"):
        reports.save_attention_overlays(tmp_path, image, attention, grid, NAMES, classes=["Edema"])
    with pytest.raises(ValueError, match="token grid"):
        reports.save_attention_overlays(tmp_path, image[:, :100], attention, grid, NAMES)
    with pytest.raises(ValueError, match="expected"):
        reports.save_attention_overlays(tmp_path, image, attention[:, :2], grid, NAMES)


def test_nan_free_macro_row_for_all_undefined(tmp_path):
    results = metrics.classification_metrics(np.zeros((3, 1)), np.zeros((3, 1)), ["Hernia"], n_bootstrap=5)
    assert math.isnan(results["macro"]["auroc"]) and results["macro"]["n_classes"] == 0
    out = reports.write_report(tmp_path, results, labels=np.zeros((3, 1)), probs=np.zeros((3, 1)), title="t")
    assert json.loads((tmp_path / "results.json").read_text())["macro"]["auroc_ci"] == [None, None]
    assert "| **macro** (0 classes) | n/a | n/a | | |" in (tmp_path / "report.md").read_text()
    _png(out["bar"])
