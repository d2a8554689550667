"""Forward values against independent NumPy formulas, PyTorch's semantics, and numerical stability.

Each test runs once per backend (the ``device`` fixture); results come back through ``.numpy()``.
"""
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinysft
from tinysft import functional as F

from .strategies import arrays, pairs_of_shapes, with_device

rng = np.random.default_rng(1234)


def t(x, device, **kwargs):
    return tinysft.tensor(x, device=device, **kwargs)


def softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----- elementwise and broadcasting -----
@with_device
@given(data=st.data(), shapes_=pairs_of_shapes)
def test_binary_ops_broadcast_like_numpy(device, data, shapes_):
    a = data.draw(arrays(shapes_.input_shapes[0]))
    b = data.draw(arrays(shapes_.input_shapes[1], st.floats(0.5, 2.0)))
    ta, tb = t(a, device), t(b, device)
    for got, expected in [(ta + tb, a + b), (ta - tb, a - b), (ta * tb, a * b), (ta / tb, a / b),
                          (2.5 - ta, 2.5 - a), (3.0 / tb, 3.0 / b), (ta ** 2, a ** 2), (-ta, -a)]:
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15)


def test_unary_ops_match_numpy(device):
    x = np.linspace(-5.0, 5.0, 41)
    tx = t(x, device)
    pos = np.linspace(0.1, 4.0, 11)
    np.testing.assert_allclose(tx.exp().numpy(), np.exp(x), rtol=1e-15)
    np.testing.assert_allclose(t(pos, device).log().numpy(), np.log(pos), rtol=1e-15)
    np.testing.assert_allclose(t(pos, device).sqrt().numpy(), np.sqrt(pos), rtol=1e-15)
    np.testing.assert_allclose((t(pos, device) ** 0.5).numpy(), np.sqrt(pos), rtol=1e-15)
    np.testing.assert_allclose(tx.abs().numpy(), np.abs(x))
    np.testing.assert_allclose(tx.tanh().numpy(), np.tanh(x), rtol=1e-15)
    np.testing.assert_allclose(tx.sigmoid().numpy(), 1 / (1 + np.exp(-x)), rtol=1e-14)
    np.testing.assert_allclose(tx.relu().numpy(), np.maximum(x, 0))


def test_sigmoid_saturates_without_overflow(device):
    x = t(np.array([-1e4, -800.0, 0.0, 800.0, 1e4], dtype=np.float32), device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings
        y = x.sigmoid()
        y.sum().backward()
    np.testing.assert_array_equal(y.numpy(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(tinysft.tensor(x.grad).numpy(), [0.0, 0.0, 0.25, 0.0, 0.0])


# ----- matmul -----
@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                             ((4,), (4, 5)), ((2, 3, 4), (4,)), ((4,), (4,)), ((1, 1), (1, 1))])
def test_matmul_matches_numpy(device, a_shape, b_shape):
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    got = t(a, device) @ t(b, device)
    assert got.shape == np.matmul(a, b).shape
    np.testing.assert_allclose(got.numpy(), a @ b, rtol=1e-13)


# ----- reductions -----
def test_reductions_match_numpy(device):
    x = rng.standard_normal((3, 4, 5))
    tx = t(x, device)
    for axis in [None, 0, -1, (0, 2), (1,)]:
        for keepdims in (False, True):
            np.testing.assert_allclose(tx.sum(axis, keepdims).numpy(), x.sum(axis, keepdims=keepdims), rtol=1e-13)
            np.testing.assert_allclose(tx.mean(axis, keepdims).numpy(), x.mean(axis, keepdims=keepdims), rtol=1e-13)
            np.testing.assert_array_equal(tx.max(axis, keepdims).numpy(), x.max(axis, keepdims=keepdims))
            # PyTorch's default is the unbiased variance (correction=1), unlike NumPy's ddof=0
            np.testing.assert_allclose(tx.var(axis, keepdims).numpy(), x.var(axis, keepdims=keepdims, ddof=1),
                                       rtol=1e-12)
            np.testing.assert_allclose(tx.var(axis, keepdims, correction=0).numpy(),
                                       x.var(axis, keepdims=keepdims), rtol=1e-12)


def test_var_of_one_element_is_nan_like_pytorch(device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(t([[1.0], [2.0]], device).var(axis=1).numpy()).all()
        assert np.isinf(t([1.0, 3.0], device).var(correction=2).numpy())  # Σ(x−μ)²/0 with Σ > 0


def test_max_splits_gradient_evenly_between_ties(device):
    x = t([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], device, requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(tinysft.tensor(x.grad).numpy(), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


# ----- softmax family and layer-norm -----
@with_device
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
def test_softmax_and_log_softmax_match_numpy(device, data, shape):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, st.floats(-30.0, 30.0)))
    np.testing.assert_allclose(F.softmax(t(x, device), axis).numpy(), softmax_np(x, axis), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(F.log_softmax(t(x, device), axis).numpy(), np.log(softmax_np(x, axis)),
                               rtol=1e-12, atol=1e-12)


def test_layer_norm_matches_formula(device):
    x = rng.standard_normal((2, 3, 8))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * w + b
    got = F.layer_norm(t(x, device), t(w, device), t(b, device)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


# ----- cross-entropy: PyTorch's semantics -----
def cross_entropy_np(logits, target, ignore_index=-100, smoothing=0.0, reduction="mean"):
    """−Σ_c y_c log p_c per row, y = (1−ε)·onehot + ε/C; ignored rows 0 and left out of the mean."""
    classes = logits.shape[-1]
    logp = np.log(softmax_np(logits.reshape(-1, classes)))
    flat = target.reshape(-1)
    valid = flat != ignore_index
    y = np.full(logp.shape, smoothing / classes)
    y[np.arange(len(flat)), np.where(valid, flat, 0)] += 1.0 - smoothing
    rows = np.where(valid, -(y * logp).sum(axis=1), 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


@with_device
@given(data=st.data(), lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4), classes=st.integers(1, 6),
       smoothing=st.sampled_from([0.0, 0.1, 0.25, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignore=st.sampled_from([-100, -1, 0]))
def test_cross_entropy_matches_numpy(device, data, lead, classes, smoothing, reduction, ignore):
    logits = data.draw(arrays(lead + (classes,), st.floats(-10.0, 10.0)))
    target = data.draw(hnp.arrays(np.int64, lead, elements=st.one_of(st.integers(0, classes - 1), st.just(ignore))))
    assume(reduction != "mean" or (target != ignore).any())
    got = F.cross_entropy(t(logits, device), t(target, device), ignore_index=ignore, label_smoothing=smoothing,
                          reduction=reduction)
    expected = cross_entropy_np(logits, target, ignore, smoothing, reduction)
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_cross_entropy_mean_is_over_non_ignored_targets(device):
    logits = rng.standard_normal((4, 3))
    target = np.array([0, -100, 2, -100])
    got = F.cross_entropy(t(logits, device), t(target, device)).item()
    logp = np.log(softmax_np(logits))
    assert got == pytest.approx(-(logp[0, 0] + logp[2, 2]) / 2, rel=1e-13)  # divided by 2, not 4


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient(device):
    x = t(rng.standard_normal((3, 4)), device, requires_grad=True)
    loss = F.cross_entropy(x, t([-100, -100, -100], device))
    assert np.isnan(loss.item())  # 0/0, as in PyTorch
    loss.backward()
    np.testing.assert_array_equal(tinysft.tensor(x.grad).numpy(), 0.0)  # PyTorch: zeros, not NaN
    assert F.cross_entropy(x, t([-100, -100, -100], device), reduction="sum").item() == 0.0


def test_cross_entropy_keeps_float32(device):
    x = t(rng.standard_normal((5, 7)).astype(np.float32), device, requires_grad=True)
    loss = F.cross_entropy(x, t([0, 1, 2, 3, 6], device), label_smoothing=0.1)
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float32


def test_mse_loss_matches_numpy(device):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    assert F.mse_loss(t(a, device), t(b, device)).item() == pytest.approx(((a - b) ** 2).mean(), rel=1e-14)
    assert F.mse_loss(t(a, device), b, reduction="sum").item() == pytest.approx(((a - b) ** 2).sum(), rel=1e-14)
    np.testing.assert_allclose(F.mse_loss(t(a, device), t(b, device), reduction="none").numpy(), (a - b) ** 2)


# ----- selection, joining, lookups, noise -----
def test_where_masked_fill_cat_stack_embedding(device):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    mask = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(F.where(mask, t(a, device), t(b, device)).numpy(), np.where(mask, a, b))
    np.testing.assert_array_equal(F.masked_fill(t(a, device), mask, -1e9).numpy(), np.where(mask, -1e9, a))
    np.testing.assert_array_equal(F.cat([t(a, device), t(b, device)], axis=1).numpy(), np.concatenate([a, b], 1))
    np.testing.assert_array_equal(F.stack([t(a, device), t(b, device)], axis=-1).numpy(), np.stack([a, b], -1))
    table = rng.standard_normal((5, 2))
    ids = np.array([[4, 0], [4, 4]])
    np.testing.assert_array_equal(F.embedding(t(table, device), t(ids, device)).numpy(), table[ids])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_expectation_and_scales_survivors(device, p):
    x = tinysft.ones(200_000, dtype=np.float64, device=device, requires_grad=True)
    y = F.dropout(x, p)
    out = y.numpy()
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1.0 / (1.0 - p), rtol=1e-15)
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / out.size)  # within 5σ
    (y * 3.0).sum().backward()
    # the gradient is the mask times 1/(1−p) times the upstream gradient
    np.testing.assert_allclose(tinysft.tensor(x.grad).numpy(), kept * 3.0 / (1.0 - p), rtol=1e-15, atol=0)


def test_dropout_edge_cases(device):
    x = t(rng.standard_normal((4, 4)), device, requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    dropped = F.dropout(x, 1.0)
    np.testing.assert_array_equal(dropped.numpy(), 0.0)
    with pytest.raises(ValueError, match="p must be in"):
        F.dropout(x, 1.5)


def test_dropout_same_generator_seed_same_mask():
    x = tinysft.ones(1000)
    first = F.dropout(x, 0.5, generator=np.random.default_rng(7)).numpy()
    second = F.dropout(x, 0.5, generator=np.random.default_rng(7)).numpy()
    np.testing.assert_array_equal(first, second)
    tinysft.manual_seed(3)
    third = F.dropout(x, 0.5).numpy()
    tinysft.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), third)


# ----- stability at extreme logits -----
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_and_cross_entropy_finite_at_1e4(device, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    x = t(logits, device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        logp = F.log_softmax(x).numpy()
        loss = F.cross_entropy(x, t([1, 2, 0], device), reduction="none")
        loss.sum().backward()
    expected_logp = [[0.0, -2e4, -1e4], [-np.log(3)] * 3, [-np.log(2), -np.log(2), -2e4 - np.log(2)]]
    np.testing.assert_allclose(logp, expected_logp, rtol=1e-6)
    np.testing.assert_allclose(loss.numpy(), [2e4, np.log(3), np.log(2)], rtol=1e-6)
    grad = tinysft.tensor(x.grad).numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, [[1, -1, 0], [1 / 3, 1 / 3, -2 / 3], [-0.5, 0.5, 0]], atol=1e-6)


def test_minus_inf_logit_is_handled(device):
    logits = np.array([[0.0, -np.inf, 1.0], [2.0, 0.5, -np.inf]])
    x = t(logits, device, requires_grad=True)
    logp = F.log_softmax(x).numpy()
    assert logp[0, 1] == -np.inf and logp[1, 2] == -np.inf
    finite = np.isfinite(logp)
    np.testing.assert_allclose(logp[finite].reshape(2, 2),
                               np.log(softmax_np(np.array([[0.0, 1.0], [2.0, 0.5]]))), rtol=1e-14)
    loss = F.cross_entropy(x, t([2, 0], device))
    loss.backward()
    assert np.isfinite(loss.item())
    expected = -(np.log(softmax_np(np.array([0.0, 1.0])))[1] + np.log(softmax_np(np.array([2.0, 0.5])))[0]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    grad = tinysft.tensor(x.grad).numpy()
    assert np.isfinite(grad).all() and grad[0, 1] == 0.0 and grad[1, 2] == 0.0


# ----- cross-check against PyTorch itself, where it is installed -----
def test_against_pytorch_when_installed():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    logits = rng.standard_normal((6, 5)) * 3
    target = np.array([0, 4, -100, 2, 2, 1])
    for smoothing in (0.0, 0.2):
        for reduction in ("mean", "sum", "none"):
            x, tx = tinysft.tensor(logits, requires_grad=True), torch.tensor(logits, requires_grad=True)
            ours = F.cross_entropy(x, target, label_smoothing=smoothing, reduction=reduction)
            theirs = tf.cross_entropy(tx, torch.tensor(target), label_smoothing=smoothing, reduction=reduction)
            np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-12)
            ours.sum().backward() if reduction == "none" else ours.backward()
            theirs.sum().backward()
            np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12, atol=1e-15)
    x = rng.standard_normal((4, 7))
    np.testing.assert_allclose(tinysft.tensor(x).var(axis=1).numpy(), torch.tensor(x).var(dim=1).numpy(), rtol=1e-13)
    np.testing.assert_allclose(tinysft.tensor(x).gelu().numpy(), tf.gelu(torch.tensor(x)).numpy(), rtol=1e-14,
                               atol=1e-15)
    np.testing.assert_allclose(tinysft.tensor(x).gelu("tanh").numpy(),
                               tf.gelu(torch.tensor(x), approximate="tanh").numpy(), rtol=1e-13, atol=1e-15)
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    np.testing.assert_allclose(F.layer_norm(tinysft.tensor(x), tinysft.tensor(w), tinysft.tensor(b)).numpy(),
                               tf.layer_norm(torch.tensor(x), (7,), torch.tensor(w), torch.tensor(b)).numpy(),
                               rtol=1e-12, atol=1e-13)
