"""Self-attention and encoder layers: NumPy references, padding invariance, gradchecks."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import nn

_erf = np.frompyfunc(math.erf, 1, 1)


def np_linear(x, lin):
    return x @ lin.weight.data.astype(np.float64).T + lin.bias.data


def np_layer_norm(x, ln):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data


def np_self_attention(x, attn, mask):
    """Independent float64 attention: loops over batch and heads, masked keys removed by -inf."""
    b, t, d = x.shape
    h, dh = attn.num_heads, attn.head_dim
    q, k, v = np_linear(x, attn.query), np_linear(x, attn.key), np_linear(x, attn.value)
    out = np.zeros((b, t, d))
    for i in range(b):
        for j in range(h):
            cols = slice(j * dh, (j + 1) * dh)
            scores = q[i, :, cols] @ k[i, :, cols].T / math.sqrt(dh)
            if mask is not None:
                scores = np.where(mask[i][None, :] == 1, scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            out[i, :, cols] = (scores / scores.sum(-1, keepdims=True)) @ v[i, :, cols]
    return out


def np_encoder_layer(x, layer, mask, norm_first=False):
    attn, ffn_in, ffn_out = layer.attention, layer.intermediate.dense, layer.output
    ln1, ln2 = attn.output.LayerNorm, ffn_out.LayerNorm
    gelu = lambda z: 0.5 * z * (1 + _erf(z / math.sqrt(2)).astype(np.float64))
    if norm_first:
        h = x + np_linear(np_self_attention(np_layer_norm(x, ln1), attn.self, mask), attn.output.dense)
        return h + np_linear(gelu(np_linear(np_layer_norm(h, ln2), ffn_in)), ffn_out.dense)
    h = np_layer_norm(x + np_linear(np_self_attention(x, attn.self, mask), attn.output.dense), ln1)
    return np_layer_norm(h + np_linear(gelu(np_linear(h, ffn_in)), ffn_out.dense), ln2)


def randomize(module, seed=0, scale=0.5):
    """Non-trivial LayerNorm weights too (they start at 1 and 0)."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data = (rng.standard_normal(p.shape) * scale).astype(p.dtype)
    return module


MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])


def test_names_follow_hf_bert():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert [n for n, _ in layer.named_parameters()] == [
        "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
        "attention.self.key.bias", "attention.self.value.weight", "attention.self.value.bias",
        "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
        "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
        "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"]


def test_self_attention_matches_numpy_with_mask():
    attn = randomize(nn.MultiHeadAttention(12, 3))
    attn.eval()
    x = np.random.default_rng(1).standard_normal((3, 5, 12)).astype(np.float32)
    out = attn(tinysft.tensor(x), MASK)
    assert out.shape == (3, 5, 12)
    np.testing.assert_allclose(out.numpy(), np_self_attention(x.astype(np.float64), attn, MASK), atol=2e-5)
    unmasked = attn(tinysft.tensor(x))
    np.testing.assert_allclose(unmasked.numpy(), np_self_attention(x.astype(np.float64), attn, None), atol=2e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_numpy(norm_first):
    layer = randomize(nn.TransformerEncoderLayer(8, 2, 16, norm_first=norm_first)).eval()
    x = np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32)
    expected = np_encoder_layer(x.astype(np.float64), layer, MASK, norm_first)
    np.testing.assert_allclose(layer(tinysft.tensor(x), MASK).numpy(), expected, atol=5e-5)


def test_fully_padded_row_stays_finite():
    attn = randomize(nn.MultiHeadAttention(4, 2)).eval()
    out = attn(tinysft.randn(1, 3, 4), np.zeros((1, 3), dtype=np.int64))
    assert np.isfinite(out.numpy()).all()


@given(st.integers(1, 4), st.integers(0, 3), st.integers(0, 2 ** 16))
def test_padding_does_not_change_unpadded_outputs(length, extra, seed):
    """Appending pad positions with arbitrary contents leaves the real positions' outputs unchanged."""
    layer = randomize(nn.TransformerEncoderLayer(8, 2, 12), seed=1).eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, length, 8)).astype(np.float32)
    short = layer(tinysft.tensor(x), np.ones((1, length), dtype=np.int64)).numpy()
    padded_x = np.concatenate([x, rng.standard_normal((1, extra, 8)).astype(np.float32) * 10], axis=1)
    mask = np.concatenate([np.ones((1, length)), np.zeros((1, extra))], axis=1).astype(np.int64)
    long = layer(tinysft.tensor(padded_x), mask).numpy()
    np.testing.assert_allclose(long[:, :length], short, atol=1e-5)


def test_padded_positions_receive_no_gradient_from_real_positions():
    layer = randomize(nn.TransformerEncoderLayer(8, 2, 12)).eval()
    x = tinysft.tensor(np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32), requires_grad=True)
    out = layer(x, np.array([[1, 1, 0, 0]]))
    out[:, :2].sum().backward()
    np.testing.assert_array_equal(x.grad[:, 2:], 0)
    assert np.abs(x.grad[:, :2]).max() > 0


def _gradcheck_module(module, x, mask):
    module.double()
    names = [n for n, _ in module.named_parameters()]
    params = dict(module.named_parameters())

    def fn(x, *weights):
        with nn.swap_parameters(module, dict(zip(names, weights))):
            return module(x, mask)

    return tinysft.gradcheck(fn, [x] + [params[n].data for n in names])


def test_gradcheck_tiny_attention():
    attn = nn.AttentionSublayer(4, 2).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    assert _gradcheck_module(attn, x, np.array([[1, 1, 0], [1, 1, 1]]))


@pytest.mark.parametrize("norm_first", [False, True])
def test_gradcheck_tiny_encoder_layer(norm_first):
    layer = randomize(nn.TransformerEncoderLayer(4, 2, 6, eps=1e-5, norm_first=norm_first), scale=0.7).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    assert _gradcheck_module(layer, x, np.array([[1, 1, 1], [1, 1, 0]]))


def test_attention_dropout_active_only_in_training():
    attn = randomize(nn.MultiHeadAttention(8, 2, dropout=0.5))
    x = tinysft.randn(2, 4, 8)
    tinysft.manual_seed(0)
    assert not np.allclose(attn(x).numpy(), attn(x).numpy())
    attn.eval()
    np.testing.assert_array_equal(attn(x).numpy(), attn(x).numpy())


def test_bad_head_count():
    with pytest.raises(ValueError, match="multiple"):
        nn.MultiHeadAttention(10, 3)
