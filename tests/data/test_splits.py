import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.data.datasets import TextClassificationDataset
from tinysft.data.splits import split_dataset, stratified_sample, stratified_split

label_arrays = st.lists(st.integers(0, 5), min_size=0, max_size=300).map(np.array)
fraction_sets = st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.5), (1.0,), (0.6, 0.2, 0.2), (0.0, 0.7, 0.3)])


@given(labels=label_arrays, fractions=fraction_sets, seed=st.integers(0, 10))
def test_split_partitions_and_keeps_proportions(labels, fractions, seed):
    parts = stratified_split(labels, fractions, seed)
    assert len(parts) == len(fractions)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    for c in np.unique(labels):
        n_c = (labels == c).sum()
        for part, f in zip(parts, fractions):
            assert abs((labels[part] == c).sum() - f * n_c) <= 1
    for part, f in zip(parts, fractions):
        assert abs(len(part) - f * len(labels)) <= len(np.unique(labels))
    again = stratified_split(labels, fractions, seed)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_seed_changes_split():
    labels = np.repeat(np.arange(3), 50)
    a = stratified_split(labels, (0.8, 0.2), seed=0)
    b = stratified_split(labels, (0.8, 0.2), seed=1)
    assert not np.array_equal(a[1], b[1])
    assert [len(p) for p in a] == [120, 30]


def test_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split([0, 1], (0.5, 0.6))
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split([0, 1], (1.5, -0.5))


@given(labels=label_arrays, n=st.integers(0, 300), seed=st.integers(0, 5))
def test_stratified_sample(labels, n, seed):
    idx = stratified_sample(labels, n, seed)
    assert len(idx) == min(n, len(labels)) and len(np.unique(idx)) == len(idx)
    assert np.array_equal(idx, stratified_sample(labels, n, seed))
    if len(labels) and n < len(labels):
        classes, counts = np.unique(labels, return_counts=True)
        got = np.array([(labels[idx] == c).sum() for c in classes])
        assert np.abs(got - n * counts / len(labels)).max() < 1


def test_split_dataset():
    ds = TextClassificationDataset([str(i) for i in range(100)], np.arange(100) % 4, ["a", "b", "c", "d"])
    train, val, test = split_dataset(ds, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (80, 12, 8)  # per class of 25: 20, 3, 2
    assert not set(train.texts) & set(val.texts) and not set(val.texts) & set(test.texts)
    assert train.class_counts().tolist() == [20, 20, 20, 20]
