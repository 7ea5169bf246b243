"""Label-efficiency subsets of a training table: seeded, patient-level, stratified.

The official code takes evenly spaced indices of the training list (eval/classification/linear_glori.py), which ignores
patients and class balance, and its refit appends the full validation set. Here a subset
is drawn from one table only, so it never holds another split's rows, and it is drawn by patient:

1. Each patient gets a label pattern: positive for a class if any of its images is positive.
2. Strata, by the rarest-positive-class rule: a patient belongs to the stratum of its rarest positive
   class (rarity = number of positive patients in the table, ties by class order); patients without a
   positive form one more stratum. Every rare class thus gets its own stratum, however common the
   classes it co-occurs with.
3. The number drawn is n = round(fraction * patients) (at least 1), shared over the strata in proportion
   to their sizes by largest remainders, so the subset has exactly n patients.
4. Coverage: for each class with positive patients, rarest first, while fewer than n patients are
   chosen, its first positive patient in a seeded random ranking is chosen if none is yet (so every
   class keeps a positive whenever n allows it). Coverage picks count against their strata's shares.
5. The rest of each stratum's share is a systematic sample (a seeded random start, then evenly spaced)
   of its patients sorted by their whole label pattern (rarest class first), then image count, then the
   random ranking: an implicit stratification on the co-occurring classes and the images per patient.

Patients are identified by `patient_id` (sorted before ranking), so a seed gives the same subset on any
machine; unknown (NaN) labels never count as positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chexfound_jax.eval.tasks import LabelTable


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, proportional to `weights` (largest remainders; ties to the lower index)."""
    weights = np.asarray(weights, np.float64)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), np.int64)
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    remainder = exact - out
    order = np.lexsort((np.arange(len(weights)), -remainder))
    out[order[: total - out.sum()]] += 1
    return out


def patient_strata(positive: np.ndarray) -> np.ndarray:
    """(P,) stratum per patient from (P, K) bool positives: its rarest positive class, or K if none."""
    positive = np.asarray(positive, bool)
    num_classes = positive.shape[1]
    if num_classes == 0:
        return np.zeros(len(positive), np.int64)
    rarity = np.argsort(positive.sum(axis=0), kind="stable")  # rarest class first
    rank_of_class = np.empty(num_classes, np.int64)
    rank_of_class[rarity] = np.arange(num_classes)
    ranks = np.where(positive, rank_of_class[None, :], num_classes)
    best = ranks.min(axis=1)
    return np.where(best < num_classes, rarity[np.minimum(best, num_classes - 1)], num_classes)


def subsample(table: LabelTable, fraction: float, seed: int) -> LabelTable:
    """The rows of a stratified, seeded draw of round(fraction * patients) of the table's patients.

    Rows keep their order in `table`; fraction 1.0 returns `table` itself.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return table
    if len(table) == 0:
        return table
    patients, inverse = np.unique(table.patient_id, return_inverse=True)
    inverse = inverse.reshape(-1)
    num_patients, num_classes = len(patients), table.labels.shape[1]
    positive = np.zeros((num_patients, num_classes), bool)
    np.logical_or.at(positive, inverse, np.asarray(table.labels) == 1)  # NaN compares False
    strata = patient_strata(positive)
    rarity = np.argsort(positive.sum(axis=0), kind="stable")  # rarest class first
    rng = np.random.default_rng(seed)
    rank = np.empty(num_patients, np.int64)
    rank[rng.permutation(num_patients)] = np.arange(num_patients)
    by_rank = np.argsort(rank)

    target = max(1, _round_half_up(fraction * num_patients))
    share = _allocate(target, np.bincount(strata, minlength=num_classes + 1))
    chosen = np.zeros(num_patients, bool)
    for k in rarity:
        if chosen.sum() >= target:
            break
        if positive[:, k].any() and not (chosen & positive[:, k]).any():
            chosen[by_rank[positive[by_rank, k]][0]] = True
    # Coverage may have taken more than a stratum's share; the other strata give up the difference.
    deficit = np.maximum(share - np.bincount(strata[chosen], minlength=num_classes + 1), 0)
    fill = np.minimum(deficit, _allocate(target - chosen.sum(), deficit))
    images = np.bincount(inverse, minlength=num_patients)
    frame = np.lexsort([rank, images, *(~positive[:, k] for k in rarity[::-1])])  # the last key is primary
    starts = rng.random(num_classes + 1)
    for s in np.flatnonzero(fill):
        candidates = frame[(strata[frame] == s) & ~chosen[frame]]
        picks = np.floor((starts[s] + np.arange(fill[s])) * len(candidates) / fill[s]).astype(np.int64)
        chosen[candidates[picks]] = True
    return table.subset(np.flatnonzero(chosen[inverse]))


def label_efficiency_runs(fractions: Sequence[float], repeats: int, seed: int) -> list[tuple[float, int, int]]:
    """(fraction, repeat, seed) of every label-efficiency run; fraction 1.0 (identical data) runs once.

    Repeat r uses seed + r for every fraction, so the subsets of one repeat share their patient ranking.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fractions = [float(f) for f in fractions]
    if bad := [f for f in fractions if not 0.0 < f <= 1.0]:
        raise ValueError(f"fractions must be in (0, 1], got {bad}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions has duplicates: {fractions}")
    return [(f, r, seed + r) for f in fractions for r in range(1 if f == 1.0 else repeats)]
