"""Data: the WordPiece tokenizer, text classification datasets, splits and the batch loader."""

from tinysft.data.datasets import DatasetError, TextClassificationDataset, load_csv, load_jsonl
from tinysft.data.loader import DataLoader, default_collate
from tinysft.data.splits import split_dataset, stratified_sample, stratified_split
from tinysft.data.tokenizer import WordPieceTokenizer
from tinysft.data.wordnet import NOUN_LEXNAMES, load_wordnet_supersenses

__all__ = [
    "DatasetError", "TextClassificationDataset", "load_csv", "load_jsonl",
    "DataLoader", "default_collate",
    "split_dataset", "stratified_sample", "stratified_split",
    "WordPieceTokenizer",
    "NOUN_LEXNAMES", "load_wordnet_supersenses",
]
