import json

import numpy as np
import pytest

from tinysft.data.datasets import DatasetError, TextClassificationDataset, load_csv, load_jsonl


def test_load_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label,extra\n"Hello, world",pos,1\n"multi\nline",neg,2\nok,pos,3\n', encoding="utf-8")
    ds = load_csv(path)
    assert ds.texts == ["Hello, world", "multi\nline", "ok"]
    assert ds.label_names == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]
    assert ds.labels.dtype == np.int64 and len(ds) == 3 and ds[1] == ("multi\nline", 0)
    assert ds.class_counts().tolist() == [1, 2]


def test_numeric_labels_sort_numerically(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\na,10\nb,9\nc,2\n")
    ds = load_csv(path, text_col="review", label_col="stars")
    assert ds.label_names == ["2", "9", "10"] and ds.labels.tolist() == [2, 1, 0]


def test_explicit_labels_and_unknown_label(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,pos\nb,neutral\n")
    ds = load_csv(path, label_names=["pos", "neutral", "neg"])
    assert ds.labels.tolist() == [0, 1] and ds.num_classes == 3
    with pytest.raises(DatasetError, match=r"line 3: unknown label 'neutral'"):
        load_csv(path, label_names=["pos", "neg"])


def test_csv_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty.csv: the file is empty"):
        load_csv(empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_csv(header_only)
    wrong = tmp_path / "w.csv"
    wrong.write_text("sentence,label\nhi,1\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['text'\]; the header has \['sentence', 'label'\]"):
        load_csv(wrong)
    short = tmp_path / "s.csv"
    short.write_text("text,label\nhi\n")
    with pytest.raises(DatasetError, match="line 2: too few fields"):
        load_csv(short)


def test_load_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"sentence": "a", "y": 1}, {"sentence": "b", "y": 0}, {"sentence": "ü", "y": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    ds = load_jsonl(path, text_col="sentence", label_col="y")
    assert ds.texts == ["a", "b", "ü"] and ds.labels.tolist() == [1, 0, 1] and ds.label_names == ["0", "1"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"line 2: invalid JSON"),
    ('{"text": "a", "label": 1}\n\n[1, 2]\n', r"line 3: expected a JSON object, got list"),
    ('{"text": "a"}\n', r"line 1: missing key\(s\) \['label'\]"),
    ('{"text": 5, "label": 1}\n', r"line 1: 'text' must be a string"),
    ("\n\n", "no examples"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "zz"}\n', r"line 2: unknown label 'zz'"),
])
def test_jsonl_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_jsonl(path, label_names=["x"] if "zz" in content else None)


def test_dataset_checks_and_subset():
    ds = TextClassificationDataset(["a", "b", "c"], [0, 2, 1], ["x", "y", "z"])
    sub = ds.subset([2, 0])
    assert sub.texts == ["c", "a"] and sub.labels.tolist() == [1, 0] and sub.label_names == ds.label_names
    with pytest.raises(DatasetError, match="labels must lie in"):
        TextClassificationDataset(["a"], [3], ["x"])
    with pytest.raises(DatasetError, match="2 texts but labels"):
        TextClassificationDataset(["a", "b"], [0], ["x"])
