"""Tiny BERT classifiers and synthetic token data for the fine-tuning tests.

The model (2 layers, hidden 16) runs a batch in about a millisecond, so whole
training runs fit in a test. Labels depend on the first token, so a few steps
of training visibly lower the loss.
"""
import numpy as np

import tinysft
from tinysft.data import ArrayDataset, DataLoader
from tinysft.models import BertConfig, BertForSequenceClassification

VOCAB, SEQ, CLASSES = 30, 6, 3


def tiny_bert(seed: int = 0, dropout: float = 0.0, dtype=np.float32, layers: int = 2):
    """A seeded 2-layer, hidden-16 BERT classifier; float64 when asked (for exact comparisons)."""
    tinysft.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    model = BertForSequenceClassification(config, num_labels=CLASSES, dropout=dropout)
    return model.astype(dtype) if dtype != np.float32 else model


def token_data(n: int = 24, seed: int = 0, ignored: int = 0) -> dict:
    """``{"input_ids", "attention_mask", "labels"}``; the last ``ignored`` labels are -100."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ))
    mask = np.ones((n, SEQ), dtype=np.int64)
    mask[::3, -2:] = 0  # some padding
    labels = ids[:, 0] % CLASSES
    if ignored:
        labels[-ignored:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loader(data, batch_size=4, shuffle=False, seed=0):
    return DataLoader(ArrayDataset(data), batch_size=batch_size, shuffle=shuffle, seed=seed)
