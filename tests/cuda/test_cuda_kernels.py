"""Kernels on the emulator against the float64 references: every registered case, hypothesis-drawn shapes,
bit-identical results under every schedule, and the launchers' argument checks.
Tolerances are stated in each kernel's module under tinysft/cuda/ops/."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinysft.cuda import checks, clip_grad_norm, clip_grad_value, softmax_cross_entropy
from tinysft.cuda.compare import ATOL, assert_close
from tinysft.cuda.emulator import schedule
from tinysft.cuda.ops import clip, cross_entropy


@pytest.mark.parametrize("case_id", list(checks.CASES))
def test_registered_case(case_id):
    errors = checks.run_case(case_id)
    assert all(e <= 1e-6 for what, e in errors.items() if what in ("loss", "lse", "norm")), errors


def _ce_run(x, t, kw, block, sched):
    with schedule(*sched):
        return softmax_cross_entropy(x, t, block_size=block, **kw)


@settings(max_examples=min(25, settings.default.max_examples), deadline=None)
@given(n=st.integers(1, 6), v=st.integers(1, 700), block=st.sampled_from([32, 64, 96, 128, 256]),
       offset=st.integers(0, 3), scale=st.sampled_from([0.1, 3.0, 80.0, 1e4]), seed=st.integers(0, 2**16),
       eps=st.sampled_from([0.0, 0.1]), z=st.sampled_from([0.0, 1e-4]), ignore=st.sampled_from([0.0, 0.3]),
       neg_inf=st.sampled_from([0.0, 0.5]))
def test_cross_entropy_random_shapes(n, v, block, offset, scale, seed, eps, z, ignore, neg_inf):
    x, t = cross_entropy.make_input(n, v, seed=seed, scale=scale, offset=offset, ignore=ignore, neg_inf=neg_inf)
    kw = dict(label_smoothing=eps, z_loss=z)
    if neg_inf and eps:
        kw["label_smoothing"] = 0.0  # with -inf logits the smoothed loss is inf by definition
    ref_loss, ref_lse, ref_grad = cross_entropy.reference(x, t, **kw)
    loss, lse, grad = _ce_run(x, t, kw, block, ("forward", 0))
    row_scale = 1.0 / max(int((t != -100).sum()), 1)
    assert_close("random", "loss", loss, ref_loss, ATOL)
    assert_close("random", "lse", lse, ref_lse, ATOL)
    assert_close("random", "dlogits", grad, ref_grad,
                  ATOL * row_scale * (1 + 2 * z * np.abs(ref_lse))[:, None])
    again = _ce_run(x, t, kw, block, ("random", seed))
    assert all(a.tobytes() == b.tobytes() for a, b in zip((loss, lse, grad), again))


@settings(max_examples=min(15, settings.default.max_examples), deadline=None)
@given(sizes=st.lists(st.integers(0, 40000), min_size=1, max_size=5), offset=st.integers(0, 3),
       max_norm=st.sampled_from([1e-3, 1.0, 1e6]), seed=st.integers(0, 2**16))
def test_clip_random_shapes(sizes, offset, max_norm, seed):
    grads = clip.make_input([(s,) for s in sizes], seed=seed, offsets=[offset] * len(sizes))
    original = [g.copy() for g in grads]
    ref_norm, ref_scaled = clip.reference(original, max_norm)
    with schedule("greedy_reverse"):
        norm, nonfinite = clip_grad_norm(grads, max_norm)
    assert not nonfinite and abs(norm - ref_norm) <= 1e-6 * ref_norm
    for g, r, x in zip(grads, ref_scaled, original):
        assert_close("random", "clipped", g, r, 2.0**-23 * np.abs(x))


def test_reference_matches_torch():
    torch = pytest.importorskip("torch")
    x, t = cross_entropy.make_input(5, 40, seed=3, ignore=0.3)
    for eps in (0.0, 0.2):
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        loss = torch.nn.functional.cross_entropy(xt, torch.tensor(t), label_smoothing=eps, reduction="sum")
        loss.backward()
        n_valid = int((t != -100).sum())
        ref_loss, _, ref_grad = cross_entropy.reference(x, t, label_smoothing=eps, row_scale=1.0)
        np.testing.assert_allclose(ref_loss.sum(), loss.item(), rtol=1e-12)
        np.testing.assert_allclose(ref_grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
        _, _, mean_grad = cross_entropy.reference(x, t, label_smoothing=eps)
        np.testing.assert_allclose(mean_grad * n_valid, xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    grads = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in (10, 7)]
    tg = [torch.tensor(g.astype(np.float64), requires_grad=True) for g in grads]
    for p, g in zip(tg, grads):
        p.grad = torch.tensor(g.astype(np.float64))
    norm = torch.nn.utils.clip_grad_norm_(tg, 0.5)
    ref_norm, ref_scaled = clip.reference(grads, 0.5)
    assert abs(norm.item() - ref_norm) <= 1e-12 * ref_norm
    for p, r in zip(tg, ref_scaled):
        np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-12)


def test_in_place_overwrites_logits():
    x, t = cross_entropy.make_input(3, 50, seed=1)
    _, _, grad = softmax_cross_entropy(x.copy(), t)
    loss, _, same = softmax_cross_entropy(x, t, in_place=True)
    assert same is x and np.array_equal(x, grad)


def test_int32_targets_are_accepted():
    x, t = cross_entropy.make_input(4, 30, seed=2)
    a = softmax_cross_entropy(x, t.astype(np.int32))
    b = softmax_cross_entropy(x, t)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("logits, targets, error, message", [
    (np.zeros((3,), np.float32), np.zeros(3, np.int64), ValueError, r"shape \(N, V\)"),
    (np.zeros((3, 4), np.float32), np.zeros(2, np.int64), ValueError, r"shape \(3,\)"),
    (np.zeros((3, 4), np.float64), np.zeros(3, np.int64), ValueError, "float32"),
    (np.zeros((4, 3), np.float32).T, np.zeros(3, np.int64), ValueError, "C-contiguous"),
    (np.zeros((3, 4), np.float32), np.zeros(3, np.float32), ValueError, "integers"),
    (np.zeros((3, 4), np.float32), np.array([0, 4, 1]), IndexError, "target 4 is out of range for 4 classes"),
    (np.zeros((3, 4), np.float32), np.array([0, -1, 1]), IndexError, "target -1 is out of range"),
])
def test_cross_entropy_rejects_bad_arguments(logits, targets, error, message):
    with pytest.raises(error, match=message):
        softmax_cross_entropy(logits, targets)


def test_out_of_range_target_does_not_touch_other_rows():
    x, t = cross_entropy.make_input(3, 10, seed=4)
    t[1] = 10
    with pytest.raises(IndexError):
        softmax_cross_entropy(x, t)


def test_clip_rejects_bad_arguments_and_handles_empty_input():
    assert clip_grad_norm([], 1.0) == (0.0, False)
    assert clip_grad_norm([np.zeros(0, np.float32)], 1.0) == (0.0, False)
    with pytest.raises(ValueError, match="float32"):
        clip_grad_norm([np.zeros(3, np.float64)], 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] must be C-contiguous"):
        clip_grad_value([np.zeros(3, np.float32), np.zeros((4, 4), np.float32)[:, 1]], 1.0)
    with pytest.raises(ValueError, match="backend must be"):
        clip_grad_norm([np.zeros(3, np.float32)], 1.0, backend="opencl")


def test_nonfinite_norm_leaves_gradients_untouched():
    g = np.array([1.0, np.inf, 3.0], np.float32)
    norm, nonfinite = clip_grad_norm([g], 1.0)
    assert nonfinite and norm == np.inf and np.array_equal(g, [1.0, np.inf, 3.0])


@pytest.mark.parametrize("name", ["tinysft.cuda", "tinysft.cuda.ops.cross_entropy", "tinysft.cuda.ops.clip"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), report=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
