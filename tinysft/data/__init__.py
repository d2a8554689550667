"""Data: the WordPiece tokenizer, text classification and array datasets, dataset sources, splits,
the batch loader and its collates."""

from tinysft.data.datasets import ArrayDataset, DatasetError, TextClassificationDataset, load_csv, load_jsonl
from tinysft.data.loader import DataLoader, default_collate, tokenizing_collate
from tinysft.data.sources import load_dataset
from tinysft.data.splits import split_dataset, stratified_sample, stratified_split, train_val_test
from tinysft.data.tokenizer import WordPieceTokenizer
from tinysft.data.wordnet import NOUN_LEXNAMES, load_wordnet_supersenses

__all__ = [
    "ArrayDataset", "DatasetError", "TextClassificationDataset", "load_csv", "load_jsonl", "load_dataset",
    "DataLoader", "default_collate", "tokenizing_collate",
    "split_dataset", "stratified_sample", "stratified_split", "train_val_test",
    "WordPieceTokenizer",
    "NOUN_LEXNAMES", "load_wordnet_supersenses",
]
