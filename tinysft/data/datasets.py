"""Text classification datasets and their CSV / JSON-lines loaders.

    >>> ds = load_csv("reviews.csv", text_col="review", label_col="stars")
    >>> ds.texts[0], ds.labels[0], ds.label_names
    ('Great film.', 4, ['1', '2', '3', '4', '5'])
    >>> train = ds.subset(np.arange(100))

Labels are mapped to ids by their sorted names (numerically when every label is an
integer, so "10" comes after "9"), or by position in an explicit `label_names`
list, in which case a label outside the list raises UnknownLabelError (a DatasetError).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..io.bounds import parse_json_object

__all__ = ["DatasetError", "UnknownLabelError", "TextClassificationDataset", "ArrayDataset", "load_csv", "load_jsonl",
           "encode_labels", "read_utf8"]


class DatasetError(ValueError):
    """A data file is missing, empty or malformed, or a label is unknown."""


class UnknownLabelError(DatasetError):
    """A label outside the given `label_names`."""


@dataclass
class TextClassificationDataset:
    """Texts with integer labels; `label_names[labels[i]]` names example i's class."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self):
        self.texts = list(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.texts),):
            raise DatasetError(f"{len(self.texts)} texts but labels of shape {self.labels.shape}")
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.label_names):
            raise DatasetError(f"labels must lie in [0, {len(self.label_names)}) to index label_names")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> TextClassificationDataset:
        """The examples at `indices`, in that order, with the same label names."""
        indices = np.asarray(indices, dtype=np.int64)
        return TextClassificationDataset([self.texts[i] for i in indices], self.labels[indices], self.label_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


class ArrayDataset:
    """Named arrays sharing their first axis (cached features, token ids, synthetic data).

    Example i is ``{name: array[i]}``; ``gather(rows)`` slices every array at once, which
    ``DataLoader`` uses instead of collating row by row.
    """

    def __init__(self, arrays: dict):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {len(v) for v in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays must share their first dimension, got lengths "
                             f"{ {k: len(v) for k, v in self.arrays.items()} }")
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}

    def gather(self, rows: np.ndarray) -> dict:
        """The batch of examples ``rows``: ``{name: array[rows]}``."""
        return {k: v[rows] for k, v in self.arrays.items()}


def read_utf8(path: str | os.PathLike, error: type[Exception] = DatasetError) -> str:
    """The text of the UTF-8 file `path` (a leading BOM dropped); `error` naming the file, and the
    line of the first byte that is not UTF-8, if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"{os.fspath(path)} does not exist") from None
    except OSError as e:
        raise error(f"{os.fspath(path)} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{os.fspath(path)}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text") from None


def _sorted_label_names(raw: Sequence) -> list[str]:
    names = {str(x) for x in raw}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def encode_labels(raw: Sequence, where: Sequence[str], label_names: Sequence[str] | None = None,
                  path: str = "") -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ids; `where[i]` locates label i (e.g. "line 7") for error messages."""
    names = [str(n) for n in label_names] if label_names is not None else _sorted_label_names(raw)
    index = {name: i for i, name in enumerate(names)}
    ids = np.empty(len(raw), dtype=np.int64)
    for i, label in enumerate(raw):
        if str(label) not in index:
            raise UnknownLabelError(f"{path}: {where[i]}: unknown label {label!r} (expected one of {names})")
        ids[i] = index[str(label)]
    return ids, names


def _dataset(path: str, texts: list[str], raw: list, where: list[str],
             label_names: Sequence[str] | None) -> TextClassificationDataset:
    """The loaders' last step: refuse an empty file, encode the labels, build the dataset."""
    if not texts:
        raise DatasetError(f"{path}: no examples found")
    labels, names = encode_labels(raw, where, label_names, path)
    return TextClassificationDataset(texts, labels, names)


def load_csv(path: str | os.PathLike, text_col: str = "text", label_col: str = "label",
             label_names: Sequence[str] | None = None) -> TextClassificationDataset:
    """Load a UTF-8 CSV file with a header row naming at least `text_col` and `label_col`; every
    row needs a non-empty label."""
    path = os.fspath(path)
    texts, raw, where = [], [], []
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    try:
        if reader.fieldnames is None:
            raise DatasetError(f"{path}: the file is empty (expected a header row)")
        missing = [c for c in (text_col, label_col) if c not in reader.fieldnames]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; the header has {reader.fieldnames}")
        for row in reader:
            if row[text_col] is None or row[label_col] is None:
                raise DatasetError(f"{path}: line {reader.line_num}: too few fields")
            if not row[label_col].strip():
                raise DatasetError(f"{path}: line {reader.line_num}: empty label")
            texts.append(row[text_col])
            raw.append(row[label_col])
            where.append(f"line {reader.line_num}")
    except csv.Error as e:
        raise DatasetError(f"{path}: line {reader.line_num}: {e}") from None
    return _dataset(path, texts, raw, where, label_names)


def load_jsonl(path: str | os.PathLike, text_col: str = "text", label_col: str = "label",
               label_names: Sequence[str] | None = None) -> TextClassificationDataset:
    """Load a UTF-8 JSON-lines file, one object per line (blank lines skipped); a label is a
    non-empty string or an integer."""
    path = os.fspath(path)
    texts, raw, where = [], [], []
    for line_num, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        record = parse_json_object(line, lambda message: DatasetError(f"{path}: line {line_num}: {message}"))
        missing = [c for c in (text_col, label_col) if c not in record]
        if missing:
            raise DatasetError(f"{path}: line {line_num}: missing key(s) {missing}")
        if not isinstance(record[text_col], str):
            raise DatasetError(f"{path}: line {line_num}: {text_col!r} must be a string")
        label = record[label_col]
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise DatasetError(f"{path}: line {line_num}: {label_col!r} must be a non-empty string or an "
                               f"integer, got {label!r}")
        texts.append(record[text_col])
        raw.append(label)
        where.append(f"line {line_num}")
    return _dataset(path, texts, raw, where, label_names)
