"""Classification metrics (AUROC, AP) with image-level bootstrap confidence intervals, in numpy.

Definitions follow scikit-learn's `roc_auc_score` (trapezoid over distinct thresholds, i.e. the
Mann-Whitney statistic with ties counted one half) and `average_precision_score` (sum over distinct
thresholds of recall increment times precision), so numbers are comparable with the literature.

Both metrics are computed from per-image *weights* over the samples of a class sorted once by
score: a point estimate uses weight 1, a bootstrap replicate uses how often each image was drawn.
That keeps the bootstrap exact (ties included) and vectorised over replicates without re-sorting.

Labels are floats: 1 positive, 0 negative, NaN or negative (e.g. the -1 "uncertain" code) unknown.
Unknown labels are excluded per class, as the official training loss masks them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

# Elements of one (images x replicates) draw-count matrix; bounds the bootstrap's working memory.
_CHUNK_ELEMENTS = 1 << 22


def known_mask(labels: np.ndarray) -> np.ndarray:
    """True where a label is known: finite and >= 0 (NaN and negative codes are unknown)."""
    labels = np.asarray(labels, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(labels) & (labels >= 0)


def _binary(labels: Any, scores: Any, where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D {0,1} labels (as bool) and finite float64 scores of the same length."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"{where}: expected 1-D labels and scores of one shape, got {y.shape} and {s.shape}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"{where}: labels must be 0 or 1, found {y[bad][:5].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{where}: scores contain NaN or inf")
    return y == 1, s


class _SortedClass(NamedTuple):
    """One class's known samples arranged for weighted AUROC / AP at tie-group resolution.

    Only groups holding a positive contribute to either metric, so each needs the negative weight
    strictly below it (`neg_below` index into the score-sorted negatives' cumulative sum) and tied
    with it (up to `neg_upto`).
    """

    neg_rows: np.ndarray  # rows of negatives, ascending score
    pos_rows: np.ndarray  # rows of positives, ascending score
    pos_starts: np.ndarray  # start of each distinct positive score within pos_rows
    neg_below: np.ndarray  # per positive group: negatives with a lower score
    neg_upto: np.ndarray  # per positive group: negatives with a lower or equal score


def _sort_class(rows: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> _SortedClass:
    neg_order = np.argsort(scores[~positive], kind="stable")
    pos_order = np.argsort(scores[positive], kind="stable")
    neg_scores, pos_scores = scores[~positive][neg_order], scores[positive][pos_order]
    pos_starts = np.flatnonzero(np.r_[True, pos_scores[1:] != pos_scores[:-1]])
    distinct = pos_scores[pos_starts]
    return _SortedClass(
        neg_rows=rows[~positive][neg_order],
        pos_rows=rows[positive][pos_order],
        pos_starts=pos_starts,
        neg_below=np.searchsorted(neg_scores, distinct, side="left"),
        neg_upto=np.searchsorted(neg_scores, distinct, side="right"),
    )


def _weighted_metrics(counts: np.ndarray, c: _SortedClass) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP for each column of per-image weights `counts` (n_images, R).

    Per positive tie group g with positive weight p_g, negatives below b_g and tied t_g:
      AUROC = sum_g p_g (b_g + t_g / 2) / (P N)
      AP    = sum_g p_g tp_g / (tp_g + fp_g) / P,  counting samples scoring >= g as predicted positive.
    Columns without positive or without negative weight are undefined (NaN for both).
    """
    neg_cum = np.zeros((len(c.neg_rows) + 1, counts.shape[1]), counts.dtype)
    np.cumsum(counts[c.neg_rows], axis=0, out=neg_cum[1:])
    pos_w = counts[c.pos_rows]
    if len(c.pos_starts) != len(c.pos_rows):
        pos_w = np.add.reduceat(pos_w, c.pos_starts, axis=0)
    gp = pos_w.astype(np.float64)
    below = neg_cum[c.neg_below].astype(np.float64)
    tied = neg_cum[c.neg_upto] - below
    n_pos, n_neg = gp.sum(axis=0), neg_cum[-1].astype(np.float64)
    tp = n_pos - (np.cumsum(gp, axis=0) - gp)
    fp = n_neg - below
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=gp > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (gp * (below + 0.5 * tied)).sum(axis=0) / (n_pos * n_neg)
        ap = (gp * precision).sum(axis=0) / n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    return np.where(defined, auc, np.nan), np.where(defined, ap, np.nan)


def _point_metrics(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    c = _sort_class(np.arange(len(scores)), positive, scores)
    auc, ap = _weighted_metrics(np.ones((len(scores), 1)), c)
    return float(auc[0]), float(ap[0])


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as sklearn's roc_auc_score; NaN when one class is absent."""
    positive, scores = _binary(labels, scores)
    if positive.all() or not positive.any():
        return float("nan")
    return _point_metrics(positive, scores)[0]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's average_precision_score; NaN without positives (sklearn would return 0 with a warning)."""
    positive, scores = _binary(labels, scores)
    if not positive.any():
        return float("nan")
    if positive.all():
        return 1.0
    return _point_metrics(positive, scores)[1]


def _counts_at_thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds) at each distinct score, thresholds decreasing (sklearn's convention)."""
    positive, scores = _binary(labels, scores)
    if not len(scores):
        raise ValueError("labels: a curve needs at least one sample")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = 1.0 + last - tps
    return fps, tps, s[last]


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as sklearn's roc_curve (first threshold inf; NaN rates if a class is absent)."""
    fps, tps, thr = _counts_at_thresholds(labels, scores)
    if drop_intermediate and len(fps) > 2:  # collinear points do not change the curve
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps, thr = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thr


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) as sklearn's precision_recall_curve: thresholds increasing, then (1, 0)."""
    fps, tps, thr = _counts_at_thresholds(labels, scores)
    total = tps + fps
    precision = np.divide(tps, total, out=np.zeros_like(tps), where=total != 0)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def bootstrap_indices(n_images: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Image indices of each replicate, drawn with replacement.

    Replicate r is the r-th `integers(0, n_images, n_images)` of `np.random.default_rng(seed)`, one
    call per replicate, so the draws do not depend on how the replicates are chunked in memory.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        yield rng.integers(0, n_images, n_images)


def _as_2d(labels: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim == 1:
        p = p[:, None]
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"labels {np.shape(labels)} and probs {np.shape(probs)} must both be (N, K) or (N,)")
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if len(names) != y.shape[1]:
        raise ValueError(f"class_names has {len(names)} names for {y.shape[1]} label columns")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {sorted({n for n in names if names.count(n) > 1})}")
    known = known_mask(y)
    bad = known & (y != 0) & (y != 1)
    if bad.any():
        k = int(np.flatnonzero(bad.any(axis=0))[0])
        raise ValueError(f"labels of class {names[k]!r} must be 1, 0, or NaN/negative for unknown; found {y[bad][0]}")
    bad_p = known & ~np.isfinite(p)
    if bad_p.any():
        k = int(np.flatnonzero(bad_p.any(axis=0))[0])
        raise ValueError(f"probs of class {names[k]!r} contain NaN or inf where the label is known")
    return y, p, names


def _percentile_ci(values: np.ndarray, confidence: float) -> list[float]:
    """Percentile interval of the defined (non-NaN) replicates; [nan, nan] if none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _macro(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """nanmean without the all-NaN warning."""
    finite = ~np.isnan(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _bootstrap_metrics(
    per_class: Sequence[_SortedClass | None], n_images: int, n_bootstrap: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n_bootstrap, K) AUROC and AP of image resamples (NaN for classes without both label values).

    A replicate is a vector of draw counts per image: each class's metrics are weighted by it, so the
    sorted scores are reused and one draw is shared by every class.
    """
    n_classes = len(per_class)
    boot_auc = np.full((n_bootstrap, n_classes), np.nan)
    boot_ap = np.full((n_bootstrap, n_classes), np.nan)
    # Draw counts (images x replicates) as float32: sums of counts stay exact integers below 2**24.
    count_dtype = np.float32 if n_images < 2**24 else np.float64
    chunk = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    draws = bootstrap_indices(n_images, n_bootstrap, seed)
    for start in range(0, n_bootstrap if any(c is not None for c in per_class) else 0, chunk):
        stop = min(start + chunk, n_bootstrap)
        idx = np.stack([next(draws) for _ in range(stop - start)])
        offsets = np.arange(stop - start)[:, None] * n_images
        counts = np.bincount((idx + offsets).ravel(), minlength=idx.size).reshape(idx.shape)
        counts = np.ascontiguousarray(counts.T, dtype=count_dtype)
        for k, c in enumerate(per_class):
            if c is not None:
                boot_auc[start:stop, k], boot_ap[start:stop, k] = _weighted_metrics(counts, c)
    return boot_auc, boot_ap


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Per-class and macro AUROC / AP with percentile bootstrap CIs over images.

    labels, probs: (N, K) or (N,). Each class uses only its known labels. A class without both label
    values gets NaN metrics, is listed under "undefined_classes" and left out of the macro means.
    The bootstrap resamples images (one draw shared by every class, so the macro interval is an
    interval of the macro statistic); a replicate in which a class lacks a label value is skipped
    for that class and the replicate's macro value is the mean over the classes it defines.
    `n_bootstrap=0` gives null intervals. Every float is a Python float (NaN where undefined).
    """
    y, p, names = _as_2d(labels, probs, class_names)
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n_images, n_classes = y.shape
    known = known_mask(y)

    per_class: list[_SortedClass | None] = []  # None: the class lacks a label value
    point_auc = np.full(n_classes, np.nan)
    point_ap = np.full(n_classes, np.nan)
    ones = np.ones((n_images, 1))
    for k in range(n_classes):
        rows = np.flatnonzero(known[:, k])
        positive = y[rows, k] == 1
        if not positive.any() or positive.all():
            per_class.append(None)
            continue
        per_class.append(_sort_class(rows, positive, p[rows, k]))
        auc, ap = _weighted_metrics(ones, per_class[-1])
        point_auc[k], point_ap[k] = auc[0], ap[0]

    boot_auc, boot_ap = _bootstrap_metrics(per_class, n_images, n_bootstrap, seed)

    def ci(values: np.ndarray) -> list[float] | None:
        return _percentile_ci(values, confidence) if n_bootstrap else None

    classes = {}
    for k, name in enumerate(names):
        n_pos = int((known[:, k] & (y[:, k] == 1)).sum())
        n_neg = int((known[:, k] & (y[:, k] == 0)).sum())
        classes[name] = {
            "auroc": float(point_auc[k]),
            "auroc_ci": ci(boot_auc[:, k]),
            "ap": float(point_ap[k]),
            "ap_ci": ci(boot_ap[:, k]),
            "positives": n_pos,
            "negatives": n_neg,
            "prevalence": n_pos / (n_pos + n_neg) if n_pos + n_neg else float("nan"),
        }
    defined = np.array([c is not None for c in per_class], dtype=bool)
    macro = {
        "auroc": float(_macro(point_auc)),
        "auroc_ci": ci(_macro(boot_auc[:, defined])),
        "ap": float(_macro(point_ap)),
        "ap_ci": ci(_macro(boot_ap[:, defined])),
        "n_classes": int(defined.sum()),
    }
    return {
        "n_images": int(n_images),
        "classes": classes,
        "macro": macro,
        "undefined_classes": [name for name, ok in zip(names, defined) if not ok],
        "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "confidence": float(confidence)},
    }


def binary_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    class_name: str = "positive",
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """classification_metrics for one binary task, (N,) labels and probabilities."""
    y, p = np.asarray(labels), np.asarray(probs)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"binary_metrics expects 1-D labels and probs, got {y.shape} and {p.shape}")
    return classification_metrics(y, p, [class_name], n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)


def paired_auroc_difference(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """AUROC(a) - AUROC(b) of two scorings of the same images, with its paired bootstrap percentile CI.

    Each replicate resamples the images once and scores both on that sample, so what the two share (the
    images) cancels out of the difference's spread. Replicates lacking a class are left out.
    """
    y = np.asarray(labels, np.float64).reshape(-1)
    a, b = (np.asarray(s, np.float64).reshape(-1) for s in (scores_a, scores_b))
    if not len(y) == len(a) == len(b):
        raise ValueError(f"labels {len(y)}, scores_a {len(a)} and scores_b {len(b)} must have one entry per image")
    diffs = np.full(n_bootstrap, np.nan)
    for r, idx in enumerate(bootstrap_indices(len(y), n_bootstrap, seed)):
        if len(np.unique(y[idx])) == 2:
            diffs[r] = auroc(y[idx], a[idx]) - auroc(y[idx], b[idx])
    return {
        "difference": auroc(y, a) - auroc(y, b),
        "ci": _percentile_ci(diffs, confidence),
        "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "confidence": float(confidence)},
    }
