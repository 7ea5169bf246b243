"""AUROC / AP / curves against scikit-learn, label masking, and the image bootstrap."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm

from chexfound_jax.eval import metrics


def _random_case(rng: np.random.Generator, n: int, prevalence: float, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(n) < prevalence).astype(np.float64)
    labels[:2] = [1.0, 0.0]  # both classes present
    scores = 0.4 * labels + rng.random(n)
    if ties:
        scores = np.round(scores * 4) / 4  # a handful of distinct values, many ties across classes
    return labels, scores


def _cases(seed: int = 0):
    rng = np.random.default_rng(seed)
    yield np.array([0.0, 1.0]), np.array([0.3, 0.3])  # tiny, tied
    yield np.array([1.0, 0.0, 1.0]), np.array([0.2, 0.5, 0.9])  # tiny
    for n, prevalence, ties in [
        (7, 0.5, True),
        (50, 0.3, False),
        (50, 0.3, True),
        (300, 0.02, False),
        (300, 0.02, True),
        (301, 0.97, True),
        (1000, 0.1, False),
    ]:
        labels, scores = _random_case(rng, n, prevalence, ties)
        yield labels, scores


def test_auroc_and_ap_match_sklearn():
    count = 0
    for labels, scores in _cases():
        assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
        assert metrics.average_precision(labels, scores) == pytest.approx(
            skm.average_precision_score(labels, scores), abs=1e-12
        )
        count += 1
    assert count >= 8


def test_hand_computed_values():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs win 1 + 1 + 0.5 + 1 of 4.
    labels, scores = np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])
    assert metrics.auroc(labels, scores) == pytest.approx(3.5 / 4)
    # thresholds 0.8: P=1/1, R=1/2; 0.4: P=2/3, R=2/2 -> AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve_matches_sklearn(drop_intermediate):
    for labels, scores in _cases(1):
        ours = metrics.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
        ref = skm.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_pr_curve_matches_sklearn():
    for labels, scores in _cases(2):
        ours = metrics.pr_curve(labels, scores)
        ref = skm.precision_recall_curve(labels, scores)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_undefined_single_class():
    scores = np.array([0.1, 0.5, 0.7])
    assert math.isnan(metrics.auroc([0, 0, 0], scores))
    assert math.isnan(metrics.auroc([1, 1, 1], scores))
    assert math.isnan(metrics.average_precision([0, 0, 0], scores))
    # sklearn agrees that AP is perfect with positives only
    assert metrics.average_precision([1, 1, 1], scores) == skm.average_precision_score([1, 1, 1], scores) == 1.0


def test_bad_binary_input():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.average_precision([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="shape"):
        metrics.roc_curve([0, 1], [0.1, 0.2, 0.3])


def test_known_mask():
    labels = np.array([[1.0, 0.0, np.nan], [-1.0, 1.0, 0.0], [np.inf, -0.5, 1.0]])
    expected = np.array([[True, True, False], [False, True, True], [False, False, True]])
    np.testing.assert_array_equal(metrics.known_mask(labels), expected)


def _labelled(rng, n, k):
    labels = (rng.random((n, k)) < 0.3).astype(np.float64)
    probs = np.clip(0.35 * labels + 0.8 * rng.random((n, k)), 0, 1).round(2)  # ties
    labels[rng.random((n, k)) < 0.15] = np.nan
    labels[rng.random((n, k)) < 0.10] = -1.0
    return labels, probs


def test_classification_metrics_masks_unknown_labels_per_class():
    rng = np.random.default_rng(3)
    labels, probs = _labelled(rng, 120, 4)
    labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 0.0)  # class 2: negatives only -> undefined
    labels[labels[:, 3] == 0, 3] = -1.0  # class 3: positives (and unknowns) only -> undefined
    names = ["Atelectasis", "Pleural Effusion", "Hernia", "Round(ed) Atelectasis"]
    res = metrics.classification_metrics(labels, probs, names, n_bootstrap=0)

    assert res["n_images"] == 120
    assert res["undefined_classes"] == ["Hernia", "Round(ed) Atelectasis"]
    assert list(res["classes"]) == names
    for k, name in enumerate(names[:2]):
        keep = ~np.isnan(labels[:, k]) & (labels[:, k] >= 0)
        y, p = labels[keep, k], probs[keep, k]
        c = res["classes"][name]
        assert c["auroc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
        assert c["ap"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
        assert (c["positives"], c["negatives"]) == (int(y.sum()), int((y == 0).sum()))
        assert c["prevalence"] == pytest.approx(y.mean())
        assert c["auroc_ci"] is None and c["ap_ci"] is None
    for name in names[2:]:
        assert math.isnan(res["classes"][name]["auroc"]) and math.isnan(res["classes"][name]["ap"])
    assert res["classes"]["Hernia"]["positives"] == 0
    assert res["classes"]["Round(ed) Atelectasis"]["negatives"] == 0
    macro = res["macro"]
    assert macro["n_classes"] == 2
    assert macro["auroc"] == pytest.approx(np.nanmean([res["classes"][n]["auroc"] for n in names]))
    assert macro["ap"] == pytest.approx(np.nanmean([res["classes"][n]["ap"] for n in names]))
    assert res["bootstrap"] == {"n": 0, "seed": 0, "confidence": 0.95}


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def test_output_is_plain_python():
    rng = np.random.default_rng(4)
    labels, probs = _labelled(rng, 60, 3)
    labels[:, 1] = 0.0
    res = metrics.classification_metrics(
        labels.astype(np.float32), probs.astype(np.float32), list("abc"), n_bootstrap=20
    )
    for leaf in _walk(res):
        assert leaf is None or type(leaf) in (float, int, str), type(leaf)
    json.dumps(res)  # serialisable (NaN as the non-standard literal; the report writer maps it to null)


def test_one_class_inputs_agree():
    rng = np.random.default_rng(5)
    labels, probs = _labelled(rng, 80, 1)
    a = metrics.binary_metrics(labels[:, 0], probs[:, 0], class_name="TB", n_bootstrap=30, seed=1)
    b = metrics.classification_metrics(labels, probs, ["TB"], n_bootstrap=30, seed=1)
    c = metrics.classification_metrics(labels[:, 0], probs[:, 0], ["TB"], n_bootstrap=30, seed=1)
    assert json.dumps(a) == json.dumps(b) == json.dumps(c)
    assert a["macro"]["auroc"] == a["classes"]["TB"]["auroc"]
    assert a["macro"]["auroc_ci"] == a["classes"]["TB"]["auroc_ci"]


def test_bad_multilabel_input_names_the_class():
    labels = np.array([[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="'Edema'"):
        metrics.classification_metrics(labels, np.zeros((2, 2)), ["Atelectasis", "Edema"])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.classification_metrics([[1.0], [0.0]], [[np.nan], [0.2]], ["Edema"])
    with pytest.raises(ValueError, match="class_names"):
        metrics.classification_metrics(np.zeros((2, 2)), np.zeros((2, 2)), ["Edema"])
    with pytest.raises(ValueError, match="duplicates"):
        metrics.classification_metrics(np.zeros((2, 2)), np.zeros((2, 2)), ["Edema", "Edema"])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        metrics.classification_metrics(np.zeros((2, 2)), np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="1-D"):
        metrics.binary_metrics(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        metrics.classification_metrics([[1.0], [0.0]], [[0.3], [0.2]], ["a"], confidence=95)


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_indices_follow_the_documented_rule():
    rng = np.random.default_rng(11)
    expected = [rng.integers(0, 17, 17) for _ in range(5)]
    got = list(metrics.bootstrap_indices(17, 5, 11))
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def _slow_bootstrap(labels, probs, n_bootstrap, seed, confidence):
    """Reference: one sklearn call per class and replicate on the same image draws."""
    n, k = labels.shape
    auc = np.full((n_bootstrap, k), np.nan)
    ap = np.full((n_bootstrap, k), np.nan)
    for b, idx in enumerate(metrics.bootstrap_indices(n, n_bootstrap, seed)):
        for c in range(k):
            y, p = labels[idx, c], probs[idx, c]
            keep = ~np.isnan(y) & (y >= 0)
            y, p = y[keep], p[keep]
            if 0 < y.sum() < len(y):
                auc[b, c] = skm.roc_auc_score(y, p)
                ap[b, c] = skm.average_precision_score(y, p)
    tail = 50 * (1 - confidence)

    def ci(v):
        v = v[~np.isnan(v)]
        return np.percentile(v, [tail, 100 - tail])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates stay NaN
        macro_auc, macro_ap = np.nanmean(auc, axis=1), np.nanmean(ap, axis=1)
    return auc, ap, ci, macro_auc, macro_ap


def test_vectorised_bootstrap_equals_slow_sklearn_loop(monkeypatch):
    rng = np.random.default_rng(7)
    labels, probs = _labelled(rng, 40, 3)
    labels[:, 2] = np.where(rng.random(40) < 0.1, 1.0, 0.0)  # rare class: some replicates lack positives
    names = ["a", "b", "c"]
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 40 * 7)  # several memory chunks of 7 replicates
    res = metrics.classification_metrics(labels, probs, names, n_bootstrap=60, seed=5, confidence=0.9)
    auc, ap, ci, macro_auc, macro_ap = _slow_bootstrap(labels, probs, 60, 5, 0.9)
    assert np.isnan(auc[:, 2]).any() and not np.isnan(auc[:, 2]).all()  # the skip path is exercised
    for c, name in enumerate(names):
        np.testing.assert_allclose(res["classes"][name]["auroc_ci"], ci(auc[:, c]), atol=1e-12)
        np.testing.assert_allclose(res["classes"][name]["ap_ci"], ci(ap[:, c]), atol=1e-12)
    np.testing.assert_allclose(res["macro"]["auroc_ci"], ci(macro_auc), atol=1e-12)
    np.testing.assert_allclose(res["macro"]["ap_ci"], ci(macro_ap), atol=1e-12)


def test_bootstrap_does_not_depend_on_chunking(monkeypatch):
    rng = np.random.default_rng(8)
    labels, probs = _labelled(rng, 50, 2)
    whole = metrics.classification_metrics(labels, probs, ["a", "b"], n_bootstrap=25, seed=2)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1)  # one replicate per chunk
    chunked = metrics.classification_metrics(labels, probs, ["a", "b"], n_bootstrap=25, seed=2)
    for entry, ref in [
        *zip(chunked["classes"].values(), whole["classes"].values(), strict=True),
        (chunked["macro"], whole["macro"]),
    ]:
        for key in ("auroc_ci", "ap_ci"):  # same draws; only float summation order may differ
            np.testing.assert_allclose(entry[key], ref[key], rtol=0, atol=1e-12)


def test_bootstrap_seeded_determinism():
    rng = np.random.default_rng(9)
    labels, probs = _labelled(rng, 100, 3)
    a = metrics.classification_metrics(labels, probs, list("xyz"), n_bootstrap=40, seed=3)
    b = metrics.classification_metrics(labels, probs, list("xyz"), n_bootstrap=40, seed=3)
    c = metrics.classification_metrics(labels, probs, list("xyz"), n_bootstrap=40, seed=4)
    assert json.dumps(a) == json.dumps(b)
    assert a["macro"]["auroc_ci"] != c["macro"]["auroc_ci"]
    assert a["macro"]["auroc"] == c["macro"]["auroc"]  # the point estimate does not depend on the seed
    assert c["bootstrap"] == {"n": 40, "seed": 4, "confidence": 0.95}


def _signal(rng, n):
    labels = (rng.random((n, 2)) < 0.3).astype(np.float64)
    return labels, 0.5 * labels + rng.random((n, 2))


def test_ci_contains_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(10)
    widths = []
    for n in (100, 2000):
        labels, probs = _signal(rng, n)
        res = metrics.classification_metrics(labels, probs, ["a", "b"], n_bootstrap=200, seed=0)
        for entry in [*res["classes"].values(), res["macro"]]:
            for key in ("auroc", "ap"):
                lo, hi = entry[f"{key}_ci"]
                assert lo < entry[key] < hi
        lo, hi = res["macro"]["auroc_ci"]
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(n): expect about 0.22x


def test_perfect_separation_gives_degenerate_interval():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=np.float64)
    probs = labels * 0.5 + 0.1 * np.arange(10) / 10  # every positive above every negative
    res = metrics.binary_metrics(labels, probs, n_bootstrap=100, seed=0)
    c = res["classes"]["positive"]
    assert c["auroc"] == c["ap"] == 1.0
    assert c["auroc_ci"] == [1.0, 1.0] and c["ap_ci"] == [1.0, 1.0]


def test_undefined_class_gets_null_interval():
    labels = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, np.nan], [0.0, 0.0]])
    res = metrics.classification_metrics(labels, np.full((4, 2), 0.5), ["a", "b"], n_bootstrap=10)
    assert res["undefined_classes"] == ["b"]
    assert all(math.isnan(v) for v in res["classes"]["b"]["auroc_ci"])
    assert res["classes"]["a"]["auroc"] == 0.5  # all tied
    assert res["macro"]["n_classes"] == 1 and res["macro"]["auroc"] == 0.5
