"""Analytic identities the fused ops must satisfy, and the special functions against math.erf."""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinysft
from tinysft import functional as F
from tinysft.special import erf, normal_cdf, normal_pdf

from .strategies import arrays, with_device


def softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@st.composite
def logits_and_targets(draw, min_rows=1):
    rows = draw(st.integers(min_rows, 6))
    classes = draw(st.integers(1, 7))
    logits = draw(arrays((rows, classes), st.floats(-8.0, 8.0)))
    target = draw(hnp.arrays(np.int64, (rows,), elements=st.one_of(st.integers(0, classes - 1), st.just(-100))))
    return logits, target


# ----- cross-entropy's gradient in closed form -----
@with_device
@given(case=logits_and_targets(), smoothing=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_cross_entropy_gradient_is_softmax_minus_target_over_n(device, case, smoothing):
    logits, target = case
    valid = target != -100
    assume(valid.any())
    rows, classes = logits.shape
    x = tinysft.tensor(logits, device=device, requires_grad=True)
    F.cross_entropy(x, tinysft.tensor(target, device=device), label_smoothing=smoothing).backward()

    y = np.full((rows, classes), smoothing / classes)
    y[np.arange(rows), np.where(valid, target, 0)] += 1.0 - smoothing
    expected = (softmax_np(logits) - y) / valid.sum()  # N counts only the rows that are not ignored
    expected[~valid] = 0.0  # ignored rows get no gradient
    np.testing.assert_allclose(tinysft.tensor(x.grad).numpy(), expected, rtol=1e-10, atol=1e-13)


def test_cross_entropy_ignored_rows_have_zero_gradient_and_do_not_count(device):
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [1.0, 1.0, -3.0]])
    x = tinysft.tensor(logits, device=device, requires_grad=True)
    F.cross_entropy(x, tinysft.tensor([2, -100, 0], device=device)).backward()
    grad = tinysft.tensor(x.grad).numpy()
    assert np.all(grad[1] == 0.0)
    onehot = np.eye(3)[[2, 0]]
    np.testing.assert_allclose(grad[[0, 2]], (softmax_np(logits[[0, 2]]) - onehot) / 2, rtol=1e-12)


# ----- log-softmax and layer-norm -----
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
def test_log_softmax_rows_logsumexp_to_zero(data, shape):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, st.floats(-50.0, 50.0)))
    out = F.log_softmax(tinysft.tensor(x), axis=axis).numpy()
    peak = out.max(axis=axis, keepdims=True)
    lse = (peak + np.log(np.exp(out - peak).sum(axis=axis, keepdims=True))).squeeze(axis)
    np.testing.assert_allclose(lse, 0.0, atol=1e-12)
    np.testing.assert_allclose(F.softmax(tinysft.tensor(x), axis=axis).numpy().sum(axis=axis), 1.0, rtol=1e-12)


@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=6))
def test_layer_norm_rows_have_zero_mean_unit_variance(data, shape):
    x = data.draw(arrays(shape, st.floats(-10.0, 10.0)))
    spread = x.std(axis=-1)
    assume(spread.min() > 1e-2)  # ε = 1e-5 then shifts the variance by < 1e-3 relative
    out = F.layer_norm(tinysft.tensor(x), eps=0.0).numpy()
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, rtol=1e-10)  # biased variance, as layer_norm uses
    with_eps = F.layer_norm(tinysft.tensor(x)).numpy()
    np.testing.assert_allclose(with_eps.var(axis=-1), spread ** 2 / (spread ** 2 + 1e-5), rtol=1e-10)


def test_layer_norm_affine_is_scale_then_shift(device):
    x = np.random.default_rng(0).standard_normal((4, 5))
    w, b = np.linspace(0.5, 2.0, 5), np.linspace(-1.0, 1.0, 5)
    plain = F.layer_norm(tinysft.tensor(x, device=device)).numpy()
    affine = F.layer_norm(tinysft.tensor(x, device=device), tinysft.tensor(w, device=device),
                          tinysft.tensor(b, device=device)).numpy()
    np.testing.assert_allclose(affine, plain * w + b, rtol=1e-13, atol=1e-14)


# ----- erf and GELU against math.erf -----
def erf_reference(x):
    return np.array([math.erf(v) for v in np.asarray(x, dtype=np.float64).ravel()]).reshape(np.shape(x))


def gelu_reference(x):
    """x·Φ(x) in float64 via math.erf."""
    x = np.asarray(x, dtype=np.float64)
    return x * 0.5 * (1.0 + erf_reference(x / math.sqrt(2.0)))


ERF_GRID = np.concatenate([np.linspace(-6.0, 6.0, 2401), [-1e3, -40.0, -27.0, -8.0, -5.9, 5.9, 8.0, 27.0, 40.0, 1e3],
                           [-1.0 - 1e-15, -1.0, 1.0, 1.0 + 1e-15, 1e-300, -1e-300, 1e-8, 0.0]])


def test_erf_float64_against_math_erf_on_a_grid_with_large_x():
    got = erf(ERF_GRID)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, erf_reference(ERF_GRID), rtol=2e-16 * 4, atol=1e-16 * 4)
    assert np.all(np.abs(got) <= 1.0)
    assert np.all(erf(np.array([8.0, 30.0, 1e300, np.inf])) == 1.0)
    assert np.all(erf(np.array([-8.0, -30.0, -1e300, -np.inf])) == -1.0)
    assert np.isnan(erf(np.array([np.nan]))).all()


def test_erf_odd_and_scalar_inputs():
    np.testing.assert_array_equal(erf(-ERF_GRID), -erf(ERF_GRID))
    assert float(erf(0.5)) == pytest.approx(math.erf(0.5), rel=1e-15)  # a Python float
    assert float(erf(np.float64(-2.0))) == pytest.approx(math.erf(-2.0), rel=1e-15)  # a NumPy scalar
    assert float(erf(np.array(3.0))) == pytest.approx(math.erf(3.0), rel=1e-15)  # a 0-d array


# dense float32 grids: the worst errors of a rational approximation sit between coarse grid points
DENSE32 = np.linspace(-8.0, 8.0, 200_001).astype(np.float32)


def test_erf_float32_stays_float32_and_accurate():
    got = erf(DENSE32)
    assert got.dtype == np.float32
    # special.py documents 4.5e-7 for its float32 (Eigen) erf (measured 4.43e-7 on this grid)
    assert np.abs(got - erf_reference(DENSE32)).max() <= 4.5e-7


def test_normal_cdf_and_pdf():
    x = np.linspace(-8, 8, 401)
    np.testing.assert_allclose(normal_cdf(x), 0.5 * (1 + erf_reference(x / math.sqrt(2))), atol=1e-16 * 4)
    np.testing.assert_allclose(normal_pdf(x), np.exp(-x * x / 2) / math.sqrt(2 * math.pi), rtol=1e-15)


GELU_GRID = np.linspace(-6.0, 6.0, 4801)


def test_gelu_exact_float64_within_1e15_of_math_erf():
    got = tinysft.tensor(GELU_GRID).gelu().numpy()
    assert got.dtype == np.float64
    assert np.abs(got - gelu_reference(GELU_GRID)).max() <= 1e-15


def test_gelu_exact_float32_within_4e7_of_math_erf():
    got = tinysft.tensor(DENSE32).gelu().numpy()
    assert got.dtype == np.float32
    error = np.abs(got - gelu_reference(DENSE32))
    # float32 uses Eigen's rational erf (max abs error 4.5e-7 in erf, halved in Φ), relative beyond
    # |x| = 1: float32 holds gelu(x) ≈ x only to half an ulp (2.4e-7 for values in [4, 8)).
    # Measured on this grid: 1.2e-7 for |x| <= 1, 2.44e-7·max(1, |x|) overall; PyTorch 2.13's
    # float32 gelu: 7.9e-8 and 3.47e-7·max(1, |x|).
    assert np.all(error <= 4e-7 * np.maximum(1.0, np.abs(DENSE32)))
    assert error[np.abs(DENSE32) <= 1].max() <= 4e-7


def test_gelu_derivative_against_reference():
    x = tinysft.tensor(GELU_GRID, requires_grad=True)
    x.gelu().sum().backward()
    expected = 0.5 * (1 + erf_reference(GELU_GRID / math.sqrt(2))) + GELU_GRID * np.exp(-GELU_GRID ** 2 / 2) / math.sqrt(
        2 * math.pi)
    np.testing.assert_allclose(x.grad, expected, atol=4e-16)


def test_gelu_tanh_against_formula(device):
    x = GELU_GRID
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(tinysft.tensor(x, device=device).gelu("tanh").numpy(), expected, rtol=1e-14,
                               atol=1e-15)
    # the approximation stays within 1e-3 of the exact GELU (its known accuracy)
    assert np.abs(expected - gelu_reference(x)).max() < 1e-3
