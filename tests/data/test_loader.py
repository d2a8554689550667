import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.data.datasets import ArrayDataset, TextClassificationDataset
from tinysft.data.loader import DataLoader, default_collate


def make_dataset(n):
    return TextClassificationDataset([f"t{i}" for i in range(n)], np.arange(n) % 3, ["a", "b", "c"])


def ids(batch):
    texts, _ = batch
    return [int(t[1:]) for t in texts]


def test_batches_cover_each_example_once_per_epoch():
    loader = DataLoader(make_dataset(10), batch_size=4, seed=1)
    assert len(loader) == 3
    epoch0 = [ids(b) for b in loader]
    epoch1 = [ids(b) for b in loader]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(np.concatenate(epoch0)) == list(range(10)) == sorted(np.concatenate(epoch1))
    assert epoch0 != epoch1 and loader.epoch == 2
    assert [ids(b) for b in DataLoader(make_dataset(10), batch_size=4, seed=1)] == epoch0
    assert [ids(b) for b in DataLoader(make_dataset(10), batch_size=4, seed=2)] != epoch0


def test_no_shuffle_drop_last_and_collate():
    loader = DataLoader(make_dataset(10), batch_size=4, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(loader) == 2 and [ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    texts, labels = batches[0]
    assert texts == ["t0", "t1", "t2", "t3"] and labels.tolist() == [0, 1, 2, 0] and labels.dtype == np.int64
    assert default_collate([{"x": np.ones(2), "s": "a"}, {"x": np.zeros(2), "s": "b"}])["x"].shape == (2, 2)
    custom = DataLoader(make_dataset(5), batch_size=2, collate=len)
    assert list(custom) == [2, 2, 1]


@given(n=st.integers(0, 30), batch_size=st.integers(1, 7), stop=st.integers(0, 40), seed=st.integers(0, 3))
def test_resume_sees_exactly_the_remaining_batches(n, batch_size, stop, seed):
    """Run 3 epochs uninterrupted; separately stop after `stop` batches, save, restore, finish."""
    def run(loader, epochs):
        out = []
        while loader.state_dict()["epoch"] < epochs:
            out += [ids(b) for b in loader]
        return out

    full = run(DataLoader(make_dataset(n), batch_size, seed=seed), 3)
    first = DataLoader(make_dataset(n), batch_size, seed=seed)
    seen = []
    while len(seen) < stop and first.state_dict()["epoch"] < 3:
        for batch in first:
            seen.append(ids(batch))
            if len(seen) == stop:
                break
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DataLoader(make_dataset(n), batch_size, seed=seed)
    resumed.load_state_dict(state)
    assert seen + run(resumed, 3) == full


def test_state_mismatch_raises():
    state = DataLoader(make_dataset(10), 4).state_dict()
    with pytest.raises(ValueError, match="num_examples"):
        DataLoader(make_dataset(11), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(make_dataset(10), 5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        DataLoader(make_dataset(10), 0)


def test_array_dataset_batches_are_row_slices_in_the_loader_order():
    """An ArrayDataset is batched by slicing every array at the epoch's rows (no per-row collate)."""
    x, y = np.arange(20).reshape(10, 2), np.arange(10) * 10
    loader = DataLoader(ArrayDataset({"x": x, "labels": y}), batch_size=4, shuffle=True, seed=3)
    order = loader.epoch_order(0)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    for i, batch in enumerate(batches):
        rows = order[4 * i:4 * i + 4]
        np.testing.assert_array_equal(batch["x"], x[rows])
        np.testing.assert_array_equal(batch["labels"], y[rows])
    assert ArrayDataset({"x": x})[3]["x"].tolist() == [6, 7]


def test_array_dataset_resumes_and_validates_like_any_dataset():
    data = {"x": np.arange(9.0)}
    original = DataLoader(ArrayDataset(data), batch_size=2, seed=1)
    it = iter(original)
    next(it)
    state = original.state_dict()
    restored = DataLoader(ArrayDataset(data), batch_size=2, seed=1)
    restored.load_state_dict(state)
    assert [b["x"].tolist() for b in restored] == [b["x"].tolist() for b in it]
    with pytest.raises(ValueError, match="num_examples"):
        DataLoader(ArrayDataset({"x": np.arange(8.0)}), batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="first dimension"):
        ArrayDataset({"x": np.arange(3), "y": np.arange(4)})
