"""Picking a dataset by name: the built-in WordNet supersenses or a CSV / JSON-lines file.

``load_dataset("wordnet", max_examples=3000, seed=0)`` or ``load_dataset("reviews.csv")``;
``max_examples`` takes a stratified subsample (0 = all) drawn by ``seed``.
"""
from __future__ import annotations

from pathlib import Path

from .datasets import TextClassificationDataset, load_csv, load_jsonl
from .splits import stratified_sample
from .wordnet import load_wordnet_supersenses

__all__ = ["load_dataset", "FILE_LOADERS"]

FILE_LOADERS = {".csv": load_csv, ".jsonl": load_jsonl, ".json": load_jsonl}


def load_dataset(source: str, max_examples: int = 0, seed: int = 0) -> TextClassificationDataset:
    """The dataset ``source`` names: 'wordnet', or a .csv / .jsonl file with text and label columns."""
    if source == "wordnet":
        return load_wordnet_supersenses(max_examples=max_examples or None, seed=seed)
    path = Path(source)
    if path.suffix.lower() not in FILE_LOADERS:
        raise ValueError(f"data {source!r}: expected 'wordnet' or a .csv / .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    dataset = FILE_LOADERS[path.suffix.lower()](path)
    if max_examples and len(dataset) > max_examples:
        dataset = dataset.subset(stratified_sample(dataset.labels, max_examples, seed=seed))
    return dataset
