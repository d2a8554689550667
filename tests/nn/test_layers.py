"""Layers against independent NumPy computations, plus gradchecks and the fast GELU kernel."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import functional as F
from tinysft import nn

_erf = np.frompyfunc(math.erf, 1, 1)


def erf64(x):
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64)


def gradcheck_module(module, x, names=None):
    """gradcheck ``module(x)`` with respect to x and the named parameters (module cast to float64)."""
    module.double()
    params = dict(module.named_parameters())
    names = list(params) if names is None else names

    def fn(x, *weights):
        with nn.swap_parameters(module, dict(zip(names, weights))):
            return module(x)

    return tinysft.gradcheck(fn, [x] + [params[n].data for n in names])


def test_linear_matches_numpy_and_torch_layout():
    tinysft.manual_seed(0)
    lin = nn.Linear(5, 3)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (3,)
    bound = 1 / math.sqrt(5)
    assert np.abs(lin.weight.data).max() <= bound and np.abs(lin.bias.data).max() <= bound
    x = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
    y = lin(tinysft.tensor(x))
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y.numpy(), x @ lin.weight.data.T + lin.bias.data, rtol=1e-5, atol=1e-6)
    assert nn.Linear(5, 3, bias=False).bias is None
    assert [n for n, _ in nn.Linear(5, 3, bias=False).named_parameters()] == ["weight"]


def test_linear_init_repeats_with_seed_and_generator():
    tinysft.manual_seed(7)
    a = nn.Linear(4, 4).weight.data
    tinysft.manual_seed(7)
    np.testing.assert_array_equal(a, nn.Linear(4, 4).weight.data)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(nn.Linear(4, 4, generator=g1).weight.data,
                                  nn.Linear(4, 4, generator=g2).weight.data)


def test_linear_gradcheck():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    assert gradcheck_module(nn.Linear(4, 3), x)


def test_layer_norm_matches_numpy():
    ln = nn.LayerNorm(6, eps=1e-12)
    ln.weight.data[:] = np.linspace(0.5, 2, 6)
    ln.bias.data[:] = np.linspace(-1, 1, 6)
    x = np.random.default_rng(0).standard_normal((3, 2, 6)).astype(np.float32) * 3 + 1
    x64 = x.astype(np.float64)
    mu, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    expected = (x64 - mu) / np.sqrt(var + 1e-12) * ln.weight.data + ln.bias.data
    np.testing.assert_allclose(ln(tinysft.tensor(x)).numpy(), expected, atol=2e-6)
    assert gradcheck_module(nn.LayerNorm(4), np.random.default_rng(1).standard_normal((2, 4)))
    assert list(dict(nn.LayerNorm(4, elementwise_affine=False).named_parameters())) == []


def test_embedding_lookup_and_padding_idx_gets_no_gradient():
    emb = nn.Embedding(6, 3, padding_idx=0)
    np.testing.assert_array_equal(emb.weight.data[0], 0)
    emb.weight.data[0] = 5.0  # the forward still reads the padding row (as PyTorch)
    ids = np.array([[0, 2, 2], [1, 0, 5]])
    out = emb(ids)
    np.testing.assert_array_equal(out.numpy(), emb.weight.data[ids])
    out.sum().backward()
    expected = np.zeros((6, 3), np.float32)
    np.add.at(expected, ids, 1.0)
    expected[0] = 0
    np.testing.assert_array_equal(emb.weight.grad, expected)
    plain = nn.Embedding(6, 3)
    plain(ids).sum().backward()
    assert plain.weight.grad[0, 0] == 2.0
    with pytest.raises(IndexError):
        emb(np.array([6]))


def test_dropout_module_follows_training_flag():
    tinysft.manual_seed(0)
    drop = nn.Dropout(0.5)
    x = tinysft.ones(1000)
    y = drop(x).numpy()
    assert set(np.unique(y)) <= {0.0, 2.0} and 300 < (y == 0).sum() < 700
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fast_gelu_matches_float64_formula(approximate):
    x = np.concatenate([np.linspace(-10, 10, 20001), [0.0, -0.0, 1e-30, -40, 40]]).astype(np.float32)
    x64 = x.astype(np.float64)
    if approximate == "none":
        expected = 0.5 * x64 * (1 + erf64(x64 / math.sqrt(2)))
        dexpected = 0.5 * (1 + erf64(x64 / math.sqrt(2))) + x64 * np.exp(-0.5 * x64 ** 2) / math.sqrt(2 * math.pi)
    else:
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (x64 + 0.044715 * x64 ** 3))
        expected = 0.5 * x64 * (1 + t)
        dexpected = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * c * (1 + 3 * 0.044715 * x64 ** 2)
    xt = tinysft.tensor(x, requires_grad=True)
    y = F.gelu(xt, approximate)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), expected, atol=2e-6, rtol=2e-6)
    y.sum().backward()
    np.testing.assert_allclose(xt.grad, dexpected, atol=3e-6, rtol=1e-5)
    # and it agrees with the core's Tensor.gelu
    np.testing.assert_allclose(y.numpy(), tinysft.tensor(x).gelu(approximate).numpy(), atol=2e-6)


@given(st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=40))
def test_fast_gelu_property_close_to_core(values):
    x = np.array(values, dtype=np.float32)
    np.testing.assert_allclose(nn.GELU()(tinysft.tensor(x)).numpy(), tinysft.tensor(x).gelu().numpy(),
                               atol=2e-6)


def test_gelu_float64_falls_back_and_gradchecks():
    x = np.random.default_rng(0).standard_normal((3, 4)) * 2
    assert F.gelu(tinysft.tensor(x)).dtype == np.float64
    assert tinysft.gradcheck(lambda t: F.gelu(t), [x])
    assert tinysft.gradcheck(lambda t: F.gelu(t, "tanh"), [x])
    with pytest.raises(ValueError):
        nn.GELU("fast")


def test_activation_names_and_mlp():
    assert isinstance(nn.activation("gelu_new"), nn.GELU) and nn.activation("gelu_new").approximate == "tanh"
    assert isinstance(nn.activation(nn.ReLU), nn.ReLU)
    with pytest.raises(ValueError, match="unknown activation"):
        nn.activation("swish")
    mlp = nn.MLP(4, [8, 6], 2, activation_fn="relu", dropout=0.1)
    assert [n for n, _ in mlp.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias", "layers.6.weight", "layers.6.bias"]
    assert mlp(tinysft.randn(5, 4)).shape == (5, 2)
    mlp.eval()
    assert gradcheck_module(nn.MLP(3, [4], 2, activation_fn=nn.Tanh()), np.random.default_rng(0).standard_normal((2, 3)))
