"""load_dataset by name, and the (train, validation, test) split the commands use."""
import numpy as np
import pytest

from tinysft.data import load_dataset, train_val_test


def write_csv(path, n=40, classes=4):
    rows = ["text,label"] + [f"example {i},c{i % classes}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_csv_file_and_a_stratified_subsample(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    full = load_dataset(str(path))
    assert len(full) == 40 and full.label_names == ["c0", "c1", "c2", "c3"]
    sample = load_dataset(str(path), max_examples=20, seed=1)
    assert len(sample) == 20 and sample.class_counts().tolist() == [5, 5, 5, 5]
    assert load_dataset(str(path), max_examples=20, seed=1).texts == sample.texts  # the seed fixes the sample
    assert len(load_dataset(str(path), max_examples=100)) == 40  # more than there are: all


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="expected 'wordnet' or a .csv / .jsonl file"):
        load_dataset(str(tmp_path / "d.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.jsonl"))


def test_train_val_test_takes_its_shares_of_every_class(tmp_path):
    dataset = load_dataset(str(write_csv(tmp_path / "d.csv", n=80)))
    train, val, test = train_val_test(dataset, 0.25, 0.25, seed=0)
    assert [len(train), len(val), len(test)] == [40, 20, 20]
    for part in (train, val, test):
        counts = part.class_counts()
        assert counts.min() == counts.max()  # 80 examples, 4 classes: the shares divide evenly
    assert not set(train.texts) & set(val.texts) and not set(val.texts) & set(test.texts)
    again = train_val_test(dataset, 0.25, 0.25, seed=0)
    assert [p.texts for p in again] == [p.texts for p in (train, val, test)]
    assert np.array_equal(np.sort(np.concatenate([train.labels, val.labels, test.labels])), np.sort(dataset.labels))
