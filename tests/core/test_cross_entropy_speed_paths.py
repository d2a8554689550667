"""The NumPy cross-entropy's fast paths against a float64 formula written here.

``_cross_entropy_rows`` works in row blocks of about ``CE_BLOCK_ELEMENTS`` logits, shifts a
block by its largest logit (or not at all when e^x is safe), redoes rows far below that
shift with their own max, spreads the blocks over threads, may write the gradient over
the logits, and ``cross_entropy`` hands its gradient, in a buffer reused across calls once
no one holds it, to the logits without a copy. Each of those is checked here: tiny blocks
(one row, a few rows), rows thousands apart in one block, inf/NaN rows, 1–3 threads giving
the same bits, in place against out of place, the no-grad loss, the handed-over gradient
being edited, and a held gradient never being reused.
"""
import math
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import functional as F
from tinysft import no_grad, threads

IGNORE = -100


def reference(logits, target, smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Per-row losses (N,) and d(reduced loss)/d logits (N, C) in float64, each row with its own
    max: loss_i = (1−ε)(lse_i − x_i,t) + ε(lse_i − mean_c x_ic) + z·lse_i²,
    dx_i = s·(p_i(1 + 2z·lse_i) − (1−ε)·onehot − ε/C), s = 1/kept for "mean", else 1."""
    rows, classes = logits.shape
    kept = int((target != IGNORE).sum())
    scale = (1.0 / kept if kept else 0.0) if reduction == "mean" else 1.0
    losses, grad = np.zeros(rows), np.zeros((rows, classes))
    for i in range(rows):
        if target[i] == IGNORE:
            continue
        x = [float(v) for v in logits[i]]
        top = max(x)
        lse = top + math.log(sum(math.exp(v - top) for v in x))
        losses[i] = ((1 - smoothing) * (lse - x[target[i]]) + smoothing * (lse - sum(x) / classes)
                     + z_loss * lse * lse)
        for c in range(classes):
            p = math.exp(x[c] - lse)
            y = (1 - smoothing) * (c == target[i]) + smoothing / classes
            grad[i, c] = scale * (p * (1 + 2 * z_loss * lse) - y)
    return losses, grad


def run(logits, target, **kw):
    """cross_entropy's loss and the logits' gradient."""
    x = tinysft.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(x, target, **kw)
    loss.backward(np.ones(loss.shape, logits.dtype))
    return loss.data, x.grad


@st.composite
def problems(draw):
    """float64 logits (N, C) whose rows sit at offsets far apart (so one block mixes rows
    thousands apart, rows beyond the no-shift window and rows below the floor), targets with
    some ignored, a block size of 1 to 70 logits, and the loss's options."""
    rows, classes = draw(st.integers(1, 12)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    offsets = rng.choice([0.0, -50.0, 70.0, -200.0, 1e4, -1e4], rows) * draw(st.sampled_from([0.0, 1.0]))
    logits = rng.standard_normal((rows, classes)) * 3 + offsets[:, None]
    target = rng.integers(0, classes, rows)
    target[rng.random(rows) < draw(st.sampled_from([0.0, 0.4]))] = IGNORE
    options = dict(smoothing=draw(st.sampled_from([0.0, 0.2])), z_loss=draw(st.sampled_from([0.0, 1e-3])),
                   reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    return logits, target, draw(st.sampled_from([1, 3, 8, 70])), options


@given(problems())
def test_blocks_match_the_float64_formula(problem):
    logits, target, block, options = problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "CE_BLOCK_ELEMENTS", block)
        loss, grad = run(logits, target, label_smoothing=options["smoothing"], z_loss=options["z_loss"],
                         reduction=options["reduction"])
    losses, expected_grad = reference(logits, target, **options)
    kept = int((target != IGNORE).sum())
    expected = {"none": losses, "sum": losses.sum(),
                "mean": losses.sum() / kept if kept else np.nan}[options["reduction"]]
    np.testing.assert_allclose(loss, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_an_inf_or_nan_row_spoils_only_itself():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    logits[1, 2], logits[4, 0] = np.inf, np.nan
    target = np.array([0, 1, 2, 3, 4, 0])
    loss, grad = run(logits, target, reduction="none")  # the default blocks: all six rows in one
    assert np.isnan(loss[[1, 4]]).all() and np.isnan(grad[[1, 4]]).all()
    good = [0, 2, 3, 5]
    losses, expected_grad = reference(logits[good].astype(np.float64), target[good], reduction="none")
    np.testing.assert_allclose(loss[good], losses, rtol=1e-6)
    np.testing.assert_allclose(grad[good], expected_grad, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_the_bits(monkeypatch, dtype):
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((61, 9)) * 4).astype(dtype)
    target = rng.integers(0, 9, 61)
    target[::7] = IGNORE
    monkeypatch.setattr(threads, "MIN_PARALLEL", 1)
    monkeypatch.setattr(F, "CE_BLOCK_ELEMENTS", 40)  # 4 rows a block: 16 blocks
    before = threads.num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            threads.set_num_threads(count)
            results.append(run(logits, target, label_smoothing=0.1, z_loss=1e-4))
    finally:
        threads.set_num_threads(before)
    for loss, grad in results[1:]:
        assert loss.tobytes() == results[0][0].tobytes() and grad.tobytes() == results[0][1].tobytes()
    _, expected_grad = reference(logits.astype(np.float64), target, smoothing=0.1, z_loss=1e-4)
    np.testing.assert_allclose(results[0][1], expected_grad, atol=1e-6 if dtype == np.float32 else 1e-12)


def test_full_sized_float32_blocks_on_the_threads():
    """The default block size and thread pool on 3000 × 40 float32 logits (several blocks a thread)."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((3000, 40)) * 3).astype(np.float32)
    target = rng.integers(0, 40, 3000)
    loss, grad = run(logits, target)
    losses, expected_grad = reference(logits.astype(np.float64), target)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-8)


def test_gradient_written_over_the_logits_equals_a_fresh_one(monkeypatch):
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((9, 6)) * 30  # some blocks shifted, some not
    target = rng.integers(0, 6, 9)
    valid = np.ones(9, bool)
    monkeypatch.setattr(F, "CE_BLOCK_ELEMENTS", 12)
    original = rows.copy()
    loss, grad = F._cross_entropy_rows(rows, target, valid, 0.1, 1e-3, 0.5)
    np.testing.assert_array_equal(rows, original)  # out of place: the logits are left alone
    same_loss, same_grad = F._cross_entropy_rows(rows, target, valid, 0.1, 1e-3, 0.5, out=rows)
    assert same_grad is rows
    assert same_loss.tobytes() == loss.tobytes() and same_grad.tobytes() == grad.tobytes()
    _, expected_grad = reference(original, target, smoothing=0.1, z_loss=1e-3, reduction="sum")
    np.testing.assert_allclose(grad, 0.5 * expected_grad, rtol=1e-12, atol=1e-15)


def test_no_grad_gives_the_same_loss_without_a_gradient():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((20, 8)).astype(np.float32)
    target = rng.integers(0, 8, 20)
    with_graph, _ = run(logits, target)
    with no_grad():
        without = F.cross_entropy(tinysft.tensor(logits, requires_grad=True), target)
    assert without.data.tobytes() == with_graph.tobytes() and not without.requires_grad
    _, grad = F._cross_entropy_rows(logits, target, np.ones(20, bool), 0.0, 0.0, 1.0, with_grad=False)
    assert grad is None


def test_handed_over_gradient_may_be_edited_and_a_second_backward_recomputes_it():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((5, 4))
    target = np.array([3, IGNORE, 0, 1, 1])
    weights = np.array([1.0, 2.0, -0.5, 0.0, 3.0])  # upstream gradient of reduction "none"
    x = tinysft.tensor(logits, requires_grad=True)
    loss = (F.cross_entropy(x, target, reduction="none") * tinysft.tensor(weights)).sum()
    loss.backward()
    _, per_row = reference(logits, target, reduction="none")
    np.testing.assert_allclose(x.grad, weights[:, None] * per_row, rtol=1e-12, atol=1e-15)
    x.grad *= 0.0  # the leaf owns its gradient: an optimizer edits it in place
    x.grad = None
    loss.backward()
    np.testing.assert_allclose(x.grad, weights[:, None] * per_row, rtol=1e-12, atol=1e-15)


def test_spare_gradient_is_reused_only_once_no_one_holds_it():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((8, 6)).astype(np.float32)
    target = rng.integers(0, 6, 8)
    _, expected = reference(logits.astype(np.float64), target)
    x = tinysft.tensor(logits, requires_grad=True)
    F.cross_entropy(x, target).backward()
    held = x.grad[2:]  # a view: its base is the buffer
    before = held.copy()
    x.grad = None
    F.cross_entropy(x, target).backward()
    assert not np.shares_memory(x.grad, held)  # still held: a fresh buffer
    np.testing.assert_array_equal(held, before)
    del held
    x.grad = None  # now no one holds either: the next gradient is the cached one
    cached = weakref.ref(F._spare[np.dtype(np.float32)])  # a weak reference: no holder
    F.cross_entropy(x, target).backward()
    assert cached() is not None and x.grad.base is cached()
    np.testing.assert_allclose(x.grad, expected, atol=1e-7)
    first, second = (tinysft.tensor(logits, requires_grad=True) for _ in range(2))
    losses = [F.cross_entropy(first, target), F.cross_entropy(second, target)]  # two gradients alive at once
    for loss in losses:
        loss.backward()
    assert not np.shares_memory(first.grad, second.grad)
    np.testing.assert_allclose(first.grad, expected, atol=1e-7)
    np.testing.assert_allclose(second.grad, expected, atol=1e-7)


def test_empty_batches_and_classless_logits():
    x = tinysft.tensor(np.ones((0, 5), np.float32), requires_grad=True)
    loss = F.cross_entropy(x, np.zeros(0, int), reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 5)
    with pytest.raises(tinysft.ShapeError, match="at least one class"):
        F.cross_entropy(tinysft.tensor(np.ones((3, 0))), np.full(3, IGNORE))
