"""Picking a dataset by name: the built-in WordNet supersenses or a CSV / JSON-lines file.

``load_dataset("wordnet", max_examples=3000, seed=0)`` or ``load_dataset("reviews.csv")``;
``max_examples`` takes a stratified subsample (0 = all) drawn by ``seed``. With
``label_names`` (a trained run's classes) label ``i`` is ``label_names[i]`` and a label
outside the list is an UnknownLabelError naming it (and, for a file, its line).
"""
from __future__ import annotations

from pathlib import Path

from collections.abc import Sequence

import numpy as np

from .datasets import TextClassificationDataset, UnknownLabelError, load_csv, load_jsonl
from .splits import stratified_sample
from .wordnet import load_wordnet_supersenses

__all__ = ["load_dataset", "FILE_LOADERS"]

FILE_LOADERS = {".csv": load_csv, ".jsonl": load_jsonl, ".json": load_jsonl}


def load_dataset(source: str, max_examples: int = 0, seed: int = 0,
                 label_names: Sequence[str] | None = None) -> TextClassificationDataset:
    """The dataset ``source`` names: 'wordnet', or a .csv / .jsonl file with text and label columns."""
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 (0 = all), got {max_examples}")
    if source == "wordnet":
        dataset = load_wordnet_supersenses()
        if label_names is not None:
            dataset = _relabel(dataset, list(label_names), "wordnet")
    else:
        path = Path(source)
        if path.suffix.lower() not in FILE_LOADERS:
            raise ValueError(f"data {source!r}: expected 'wordnet' or a .csv / .jsonl file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        dataset = FILE_LOADERS[path.suffix.lower()](path, label_names=label_names)
    if max_examples and len(dataset) > max_examples:
        dataset = dataset.subset(stratified_sample(dataset.labels, max_examples, seed=seed))
    return dataset


def _relabel(dataset: TextClassificationDataset, label_names: list[str], source: str) -> TextClassificationDataset:
    """``dataset`` with its labels numbered by their position in ``label_names``."""
    index = {name: i for i, name in enumerate(label_names)}
    present = set(np.unique(dataset.labels).tolist())
    unknown = [name for i, name in enumerate(dataset.label_names) if i in present and name not in index]
    if unknown:
        raise UnknownLabelError(f"{source}: unknown label {unknown[0]!r} (expected one of {label_names})")
    ids = np.array([index.get(name, -1) for name in dataset.label_names], dtype=np.int64)
    return TextClassificationDataset(dataset.texts, ids[dataset.labels], label_names)
