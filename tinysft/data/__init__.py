"""Data: the WordPiece and byte-level BPE tokenizers, the ChatML template, text classification and array datasets, dataset sources, splits,
the batch loader and its collates, and the SFT data (chat JSONL, WordNet questions, loss masks, packing)."""

from tinysft.data.bpe import BPETokenizer
from tinysft.data.chat import DEFAULT_SYSTEM_PROMPT, render_chatml, render_chatml_with_spans, tokens_in_spans
from tinysft.data.datasets import ArrayDataset, DatasetError, TextClassificationDataset, load_csv, load_jsonl
from tinysft.data.loader import DataLoader, default_collate, tokenizing_collate
from tinysft.data.sft import (IGNORE, TRAIN_ON, encode_example, encode_examples, encode_prompt, pack_examples,
                              read_sft_jsonl, render_mask, sft_collate, wordnet_sft_splits)
from tinysft.data.sources import load_dataset
from tinysft.data.splits import split_dataset, stratified_sample, stratified_split, train_val_test
from tinysft.data.tokenizer import WordPieceTokenizer
from tinysft.data.wordnet import NOUN_LEXNAMES, load_wordnet_supersenses

__all__ = [
    "ArrayDataset", "DatasetError", "TextClassificationDataset", "load_csv", "load_jsonl", "load_dataset",
    "DataLoader", "default_collate", "tokenizing_collate",
    "split_dataset", "stratified_sample", "stratified_split", "train_val_test",
    "WordPieceTokenizer", "BPETokenizer",
    "DEFAULT_SYSTEM_PROMPT", "render_chatml", "render_chatml_with_spans", "tokens_in_spans",
    "NOUN_LEXNAMES", "load_wordnet_supersenses",
    "IGNORE", "TRAIN_ON", "read_sft_jsonl", "wordnet_sft_splits", "encode_example", "encode_examples",
    "encode_prompt", "pack_examples", "sft_collate", "render_mask",
]
