"""Label-efficiency subsets: exact patient counts, patient-level, stratified, seeded, never outside the table."""

import math

import numpy as np
import pytest

from chexfound_jax.eval.subsample import label_efficiency_runs, patient_strata, subsample
from chexfound_jax.eval.tasks import LabelTable

PREVALENCE = (0.01, 0.04, 0.1, 0.3, 0.5)


def synthetic_table(num_patients=1500, seed=0, split="train", offset=0) -> LabelTable:
    """Patients of 1-3 images sharing the patient's labels (5 classes), with 5% unknown entries; rows shuffled."""
    rng = np.random.default_rng(seed)
    per_patient = (rng.random((num_patients, len(PREVALENCE))) < PREVALENCE).astype(np.float32)
    images = rng.integers(1, 4, num_patients)
    patient = np.repeat(np.arange(num_patients), images)
    labels = per_patient[patient]
    labels[rng.random(labels.shape) < 0.05] = np.nan
    order = rng.permutation(len(patient))
    n = len(patient)
    return LabelTable(
        task="synthetic",
        split=split,
        shard_split="train",
        record_index=offset + np.arange(n, dtype=np.int64),
        labels=labels[order],
        patient_id=np.array([f"{split}{p:05d}" for p in patient[order]]),
        image_id=np.array([f"{split}img{i}" for i in range(n)]),
        path=np.array([f"{split}/{i}.png" for i in range(n)]),
    )


def patients_of(table: LabelTable) -> set:
    return set(table.patient_id.tolist())


def positive_patients(table: LabelTable) -> dict:
    """{patient: bool vector of classes with a positive image}."""
    out = {}
    for p, row in zip(table.patient_id, table.labels, strict=True):
        out[p] = out.get(p, np.zeros(len(row), bool)) | (row == 1)
    return out


@pytest.fixture(scope="module")
def table():
    return synthetic_table()


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_exact_patient_counts_and_whole_patients(table, fraction):
    sub = subsample(table, fraction, seed=0)
    num_patients = len(patients_of(table))
    assert len(patients_of(sub)) == math.floor(fraction * num_patients + 0.5)
    # Every image of a chosen patient comes along, and rows are the table's own, in its order.
    chosen = np.isin(table.patient_id, list(patients_of(sub)))
    np.testing.assert_array_equal(sub.record_index, table.record_index[chosen])
    np.testing.assert_array_equal(sub.labels, table.labels[chosen])
    np.testing.assert_array_equal(sub.image_id, table.image_id[chosen])
    np.testing.assert_array_equal(sub.path, table.path[chosen])
    assert (sub.task, sub.split, sub.shard_split) == (table.task, table.split, table.shard_split)


def test_stratified_positive_rates(table):
    full = np.nanmean(table.labels, axis=0)
    pos = positive_patients(table)
    rarest = np.array([v for v in pos.values()])[:, 0].sum()
    for fraction in (0.1, 0.3):
        for seed in range(3):
            sub = subsample(table, fraction, seed)
            rate = np.nanmean(sub.labels, axis=0)
            # Within 10% of the rate (relative) or 0.005, per class.
            np.testing.assert_array_less(np.abs(rate - full), np.maximum(0.1 * full, 0.005) + 1e-9)
            # The rarest class is its own stratum: its positive patients are drawn in exact proportion.
            drawn = sum(v[0] for p, v in positive_patients(sub).items())
            assert abs(drawn - fraction * rarest) <= 1, (drawn, fraction * rarest)


def test_every_class_keeps_a_positive_when_the_fraction_allows(table):
    sub = subsample(table, 0.004, seed=3)  # 6 patients for 5 classes, the rarest with ~15 positive patients
    assert len(patients_of(sub)) == 6
    assert np.stack(list(positive_patients(sub).values())).any(axis=0).all()
    tiny = subsample(table, 0.0015, seed=3)  # 2 patients: the two rarest classes get one each
    assert len(patients_of(tiny)) == 2
    pos = np.stack(list(positive_patients(tiny).values())).any(axis=0)
    counts = np.stack(list(positive_patients(table).values())).sum(axis=0)
    assert pos[np.argsort(counts)[:2]].all()


def test_seeded(table):
    a, b, c = (subsample(table, 0.2, s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.record_index, b.record_index)
    assert patients_of(a) != patients_of(c)
    # Depends on the patients, not on where their rows sit in the table.
    order = np.random.default_rng(1).permutation(len(table))
    shuffled = subsample(table.subset(order), 0.2, 7)
    assert patients_of(shuffled) == patients_of(a)


def test_fraction_one_is_the_table_and_bad_fractions_are_refused(table):
    assert subsample(table, 1.0, seed=0) is table
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subsample(table, bad, seed=0)


def test_never_leaves_the_given_table():
    train = synthetic_table(400, seed=1, split="train")
    val = synthetic_table(100, seed=2, split="val", offset=len(train.record_index))
    for fraction in (0.05, 0.5):
        sub = subsample(train, fraction, seed=0)
        assert set(sub.record_index) <= set(train.record_index)
        assert not set(sub.record_index) & set(val.record_index)
        assert patients_of(sub) <= patients_of(train) and len(sub) < len(train)


def test_binary_table_with_unknowns():
    labels = np.array([[1], [np.nan], [0], [0], [1], [0], [np.nan], [0], [0], [0]], np.float32)
    t = LabelTable(
        "b", "train", "train", np.arange(10), labels, np.array([f"p{i}" for i in range(10)]),
        np.array([f"i{i}" for i in range(10)]), np.array([f"{i}.png" for i in range(10)]),
    )  # fmt: skip
    sub = subsample(t, 0.5, seed=0)
    assert len(sub) == 5
    assert (sub.labels == 1).sum() == 1  # 2 positive patients x 0.5


def test_patient_strata_rarest_positive_class():
    positive = np.array(
        [[1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], bool
    )  # positives per class: 2, 4, 2 -> rarity order 0, 2, 1
    np.testing.assert_array_equal(patient_strata(positive), [0, 1, 2, 3, 0, 1, 2])


def test_label_efficiency_runs():
    assert label_efficiency_runs([0.01, 0.1, 1.0], repeats=3, seed=10) == [
        (0.01, 0, 10), (0.01, 1, 11), (0.01, 2, 12), (0.1, 0, 10), (0.1, 1, 11), (0.1, 2, 12), (1.0, 0, 10),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="repeats"):
        label_efficiency_runs([0.1], repeats=0, seed=0)
    with pytest.raises(ValueError, match="fractions"):
        label_efficiency_runs([0.1, 2.0], repeats=1, seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        label_efficiency_runs([0.1, 0.1], repeats=1, seed=0)
