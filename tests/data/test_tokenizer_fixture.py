"""WordPieceTokenizer against the reference tokenizer, through a committed fixture.

tests/fixtures/tokenizer_reference.json holds the ids that transformers' tokenizer for
all-MiniLM-L6-v2 gives for tricky strings (control and format characters, Unicode spaces,
combining marks, sigma and ß, ligatures, scripts without spaces, special tokens written in the
text, over-long words, emoji sequences, ...); tests/fixtures/make_minilm_reference.py wrote it.
Needs neither transformers nor tokenizers; needs the model's vocab.txt.
"""
import json
from pathlib import Path

import pytest

from tinysft.data import WordPieceTokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_reference.json"
REFERENCE = json.loads(FIXTURE.read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return WordPieceTokenizer.from_dir(minilm_dir)


def test_fixture_covers_the_tricky_sentences():
    assert len(CASES) >= 25
    texts = [case["text"] for case in CASES]
    assert "" in texts and any(t.isspace() for t in texts)
    assert any(len(word) > 100 for t in texts for word in t.split())
    assert {"transformers", "tokenizers"} <= set(REFERENCE["versions"])


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_ids_match_the_reference_tokenizer(tokenizer, case):
    ours = tokenizer.encode(case["text"], max_length=None)
    if ours != case["input_ids"]:  # show tokens, not just ids, on failure
        assert tokenizer.convert_ids_to_tokens(ours) == tokenizer.convert_ids_to_tokens(case["input_ids"])
    assert ours == case["input_ids"]


def test_batch_encoding_matches_per_sentence_ids(tokenizer):
    texts = [case["text"] for case in CASES]
    batch = tokenizer.encode_batch(texts, max_length=None, padding=True)
    for row, mask, case in zip(batch["input_ids"], batch["attention_mask"], CASES):
        assert row[mask == 1].tolist() == case["input_ids"]
        assert (row[mask == 0] == tokenizer.pad_id).all()
