"""F.linear_cross_entropy: the chunked output head and its cross-entropy.

Gradients of hidden and weight against central finite differences in float64
(hypothesis: N = 1, leading axes, chunk sizes that do and do not divide the
rows, ignored rows, every reduction); values and gradients equal to the
unchunked ``cross_entropy(linear(h, W), t)`` and to a per-row float64 formula
written here; an all-ignored batch; the peak of its allocations against the
unchunked head's.
"""
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import ShapeError, gradcheck, no_grad
from tinysft import functional as F
from tinysft.backend import to_device
from tinysft.functional import TargetError

from .strategies import with_device

IGNORE = -100


@st.composite
def head_problems(draw):
    """hidden (lead..., D), weight (V, D), targets (lead...) with some ignored, a chunk size, a reduction."""
    lead = draw(st.sampled_from([(1,), (2,), (5,), (2, 3), (1, 4)]))
    width, classes = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal(lead + (width,))
    weight = rng.standard_normal((classes, width))
    target = rng.integers(0, classes, lead)
    target[rng.random(lead) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    rows = int(np.prod(lead))
    chunk = draw(st.sampled_from([1, 2, 3, rows, rows + 2]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return hidden, weight, target, chunk, reduction


def reference(hidden, weight, target, reduction):
    """Per row i with target t: log Σ_c exp(h_i·w_c) − h_i·w_t, in float64; 0 for ignored rows."""
    losses = []
    for h, t in zip(hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1), strict=True):
        if t == IGNORE:
            losses.append(0.0)
            continue
        z = [float(np.dot(h, w)) for w in weight]
        top = max(z)
        losses.append(top + math.log(sum(math.exp(v - top) for v in z)) - z[t])
    losses = np.array(losses)
    kept = int((target != IGNORE).sum())
    if reduction == "none":
        return losses.reshape(target.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / kept if kept else np.nan


@given(head_problems())
def test_gradients_match_finite_differences(problem):
    hidden, weight, target, chunk, reduction = problem
    if reduction == "mean" and not (target != IGNORE).any():
        reduction = "sum"  # the mean over no rows is NaN; its zero gradient is tested below
    gradcheck(lambda h, w: F.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=chunk),
              [hidden, weight])


@given(head_problems())
def test_equals_the_unchunked_head_and_the_formula(problem):
    hidden, weight, target, chunk, reduction = problem
    upstream = np.random.default_rng(1).standard_normal(target.shape) if reduction == "none" else np.array(0.7)
    results = []
    for fused in (True, False):
        h, w = tinysft.tensor(hidden, requires_grad=True), tinysft.tensor(weight, requires_grad=True)
        loss = (F.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=chunk) if fused
                else F.cross_entropy(F.linear(h, w), target, reduction=reduction))
        loss.backward(upstream)
        results.append((loss.numpy(), h.grad, w.grad))
    (value, dh, dw), (want, want_dh, want_dw) = results
    np.testing.assert_allclose(value, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(value, reference(hidden, weight, target, reduction), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-12, atol=1e-12)
    assert np.all(dh.reshape(-1, hidden.shape[-1])[target.reshape(-1) == IGNORE] == 0)


def test_all_ignored_rows_give_nan_mean_and_zero_gradients():
    h = tinysft.tensor(np.ones((3, 2)), requires_grad=True)
    w = tinysft.tensor(np.ones((4, 2)), requires_grad=True)
    loss = F.linear_cross_entropy(h, w, [IGNORE] * 3)
    assert math.isnan(loss.item())
    loss.backward()
    assert np.all(h.grad == 0) and np.all(w.grad == 0)
    assert F.linear_cross_entropy(h, w, [IGNORE] * 3, reduction="sum").item() == 0.0


def test_a_second_backward_recomputes_the_same_gradients():
    rng = np.random.default_rng(0)
    h = tinysft.tensor(rng.standard_normal((5, 3)), requires_grad=True)
    w = tinysft.tensor(rng.standard_normal((7, 3)), requires_grad=True)
    loss = F.linear_cross_entropy(h, w, [0, 6, IGNORE, 2, 2], chunk_size=2)
    loss.backward()
    first = h.grad.copy(), w.grad.copy()
    loss.backward()  # the forward's gradients were handed over: this one runs the chunks again
    np.testing.assert_allclose(h.grad, 2 * first[0], rtol=1e-12)
    np.testing.assert_allclose(w.grad, 2 * first[1], rtol=1e-12)


def test_frozen_weight_gets_no_gradient_and_no_grad_builds_no_graph():
    rng = np.random.default_rng(0)
    h = tinysft.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    w = tinysft.tensor(rng.standard_normal((5, 3)))
    F.linear_cross_entropy(h, w, [0, 1, 2, 3]).backward()
    assert w.grad is None and h.grad.shape == (4, 3)
    with no_grad():
        assert not F.linear_cross_entropy(h, w, [0, 1, 2, 3]).requires_grad


@with_device
@given(seed=st.integers(0, 2 ** 16))
def test_float32_on_each_backend(device, seed):
    """The row routine of the device (the CUDA kernel on a GPU) against the float64 formula."""
    rng = np.random.default_rng(seed)
    hidden, weight = rng.standard_normal((6, 8)), rng.standard_normal((33, 8)) * 0.5
    target = rng.integers(0, 33, 6)
    target[rng.random(6) < 0.3] = IGNORE
    h = tinysft.tensor(hidden.astype(np.float32), device=device, requires_grad=True)
    w = tinysft.tensor(weight.astype(np.float32), device=device, requires_grad=True)
    loss = F.linear_cross_entropy(h, w, tinysft.tensor(target, device=device).data, reduction="sum", chunk_size=4)
    loss.backward()
    np.testing.assert_allclose(loss.item(), reference(hidden, weight, target, "sum"), rtol=2e-5)
    h64, w64 = tinysft.tensor(hidden, requires_grad=True), tinysft.tensor(weight, requires_grad=True)
    F.cross_entropy(F.linear(h64, w64), target, reduction="sum").backward()
    np.testing.assert_allclose(to_device(h.grad, "cpu"), h64.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_device(w.grad, "cpu"), w64.grad, rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
    h, w = tinysft.tensor(np.zeros((3, 2))), tinysft.tensor(np.zeros((4, 2)))
    with pytest.raises(ShapeError, match="does not fit a weight of shape"):
        F.linear_cross_entropy(h, tinysft.tensor(np.zeros((4, 3))), [0, 1, 2])
    with pytest.raises(ShapeError, match=r"need targets of shape \(3,\)"):
        F.linear_cross_entropy(h, w, [0, 1])
    with pytest.raises(TargetError, match="target 4 at position 1 is out of range for 4 classes"):
        F.linear_cross_entropy(h, w, [0, 4, 1])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        F.linear_cross_entropy(h, w, [0, 1, 2], chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be"):
        F.linear_cross_entropy(h, w, [0, 1, 2], reduction="max")
    with pytest.raises(TypeError, match="hidden is float64 but weight is float32"):
        F.linear_cross_entropy(h, tinysft.tensor(np.zeros((4, 2), np.float32)), [0, 1, 2])


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_allocation_is_a_chunk_not_the_logits():
    """256 rows × 4,096 classes: the unchunked head allocates the (N, V) logits and their gradient
    (8 MiB in float64 each); chunks of 16 rows stay far below one of them."""
    rng = np.random.default_rng(0)
    hidden, weight = rng.standard_normal((256, 8)), rng.standard_normal((4096, 8))
    target = rng.integers(0, 4096, 256)
    logits_bytes = 256 * 4096 * 8

    def step(fused):
        h = tinysft.tensor(hidden, requires_grad=True)
        w = tinysft.tensor(weight, requires_grad=True)
        loss = (F.linear_cross_entropy(h, w, target, chunk_size=16) if fused
                else F.cross_entropy(F.linear(h, w), target))
        loss.backward()

    unchunked, chunked = peak_bytes(lambda: step(False)), peak_bytes(lambda: step(True))
    assert unchunked > 2 * logits_bytes
    assert chunked < logits_bytes / 2
