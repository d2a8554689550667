"""``tinysft embed TEXT...``: L2-normalised mean-pooled sentence embeddings of a pretrained encoder."""
import json

import numpy as np

from ..data import WordPieceTokenizer
from ..models import BertModel, locate_model
from .output import say


def embed(texts, model_name="auto", as_json=False) -> int:
    """Print the embeddings (cosine similarities too for several texts)."""
    model_dir = locate_model(None if model_name == "auto" else model_name)
    vectors = BertModel.from_pretrained(model_dir).encode(list(texts), WordPieceTokenizer.from_dir(model_dir))
    if as_json:
        say(json.dumps([[round(float(v), 6) for v in row] for row in vectors]))
        return 0
    for text, row in zip(texts, vectors):
        say(f"{text!r}: dim {row.size}, [{', '.join(f'{v:.4f}' for v in row[:4])}, ...]")
    if len(texts) > 1:
        say("cosine similarities:\n" + np.array2string(vectors @ vectors.T, precision=3))
    return 0
