"""clip_grad_norm_ / clip_grad_value_: norms, directions, non-finite gradients."""
import math
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import NonFiniteNormError, clip_grad_norm_, clip_grad_value_


def params_with_grads(grads, device="cpu"):
    params = []
    for g in grads:
        p = tinysft.tensor(np.zeros(g.shape, g.dtype), device=device, requires_grad=True)
        p.grad = p.xp.asarray(g.copy())
        params.append(p)
    return params


def global_norm(arrays, norm_type=2.0):
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    return np.abs(flat).max() if norm_type == math.inf else (np.abs(flat) ** norm_type).sum() ** (1 / norm_type)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       max_norm=st.floats(1e-2, 1e2), norm_type=st.sampled_from([2.0, 1.0, 3.0, math.inf]))
def test_clip_grad_norm(seed, n, scale, max_norm, norm_type):
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(rng.integers(1, 5, size=rng.integers(1, 3))) * scale).astype(np.float32)
             for _ in range(n)]
    params = params_with_grads(grads)
    total = clip_grad_norm_(params, max_norm, norm_type=norm_type)

    before = global_norm(grads, norm_type)
    assert isinstance(total, float)
    assert total == pytest.approx(before, rel=1e-6)
    after = [p.grad for p in params]
    assert global_norm(after, norm_type) == pytest.approx(min(before, max_norm), rel=1e-5)
    coef = min(1.0, max_norm / (before + 1e-6))
    for g, a in zip(grads, after):  # the same direction: every gradient scaled by one coefficient
        np.testing.assert_allclose(a, g * coef, rtol=1e-6, atol=1e-30)


def test_small_gradients_are_left_alone():
    grads = [np.array([0.3, -0.4], np.float32)]
    params = params_with_grads(grads)
    assert clip_grad_norm_(params, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(params[0].grad, grads[0])


def test_float32_norm_is_accumulated_accurately():
    """Millions of float32 squares: the result matches float64 far better than one float32 sum would."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (3_000_000, 70_001, 5)]
    total = clip_grad_norm_(params_with_grads(grads), 1e9)
    assert abs(total / global_norm(grads) - 1) < 1e-7


def test_missing_grads_are_skipped_and_a_single_tensor_works():
    p, q = params_with_grads([np.array([3.0, 4.0], np.float32), np.array([1.0], np.float32)])
    q.grad = None
    assert clip_grad_norm_([p, q], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad, [0.6, 0.8], rtol=1e-6)
    assert clip_grad_norm_(p, 10.0) == pytest.approx(1.0, rel=1e-6)
    q.grad = None
    assert clip_grad_norm_([q], 1.0) == 0.0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_norm_raises_and_leaves_grads_unchanged(bad):
    grads = [np.array([1.0, bad], np.float32), np.array([2.0], np.float32)]
    params = params_with_grads(grads)
    with pytest.raises(NonFiniteNormError, match="non-finite") as info:
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert isinstance(info.value, RuntimeError)
    np.testing.assert_array_equal(params[1].grad, grads[1])


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_norm_without_error_scales_like_torch(bad):
    """inf: scale 0 (finite grads become 0, inf ones nan); nan: scale nan (everything nan)."""
    params = params_with_grads([np.array([1.0, bad], np.float32), np.array([2.0], np.float32)])
    total = clip_grad_norm_(params, 1.0)
    assert not math.isfinite(total)
    expected = [[0.0, np.nan], [0.0]] if bad == np.inf else [[np.nan, np.nan], [np.nan]]
    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p.grad, np.array(e, np.float32))


def test_bad_norm_type_is_rejected():
    params = params_with_grads([np.ones(2, np.float32)])
    with pytest.raises(ValueError):
        clip_grad_norm_(params, 1.0, norm_type=0)


@given(seed=st.integers(0, 2**32 - 1), clip=st.floats(0.0, 3.0))
def test_clip_grad_value(seed, clip):
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal((3, 4)) * 3).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    params = params_with_grads(grads)
    clip_grad_value_(params, clip)
    for g, p in zip(grads, params):
        assert np.abs(p.grad).max() <= np.float32(clip)
        np.testing.assert_array_equal(p.grad, np.clip(g, -np.float32(clip), np.float32(clip)))


def test_clip_grad_value_rejects_negative():
    with pytest.raises(ValueError):
        clip_grad_value_(params_with_grads([np.ones(2, np.float32)]), -1.0)


def test_clipping_on_each_backend(device):
    grads = [np.array([3.0, 4.0], np.float32), np.array([[12.0]], np.float32)]
    params = params_with_grads(grads, device)
    assert clip_grad_norm_(params, 6.5) == pytest.approx(13.0, rel=1e-6)
    np.testing.assert_allclose(tinysft.tensor(params[0].grad).numpy(), [1.5, 2.0], rtol=1e-5)
    clip_grad_value_(params, 1.0)
    np.testing.assert_array_equal(tinysft.tensor(params[1].grad).numpy(), [[1.0]])


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator needs g++")
@pytest.mark.parametrize("bad", [None, np.inf, np.nan])
def test_kernel_path_behaves_like_the_array_path(bad, monkeypatch):
    """The CUDA dispatch, run on the kernel emulator: same norm, same scaling, same non-finite rules."""
    from tinysft.optim import clip
    first = np.array([3.0, 4.0, 0.0 if bad is None else bad], np.float32)
    grads = [first, np.array([[12.0]], np.float32)]
    expected = params_with_grads(grads)
    expected_total = clip_grad_norm_(expected, 6.5)
    monkeypatch.setattr(clip, "_on_cuda", lambda grads: True)  # NumPy arrays then go to the emulator
    params = params_with_grads(grads)
    if bad is not None:
        with pytest.raises(NonFiniteNormError):
            clip_grad_norm_(params, 6.5, error_if_nonfinite=True)
        np.testing.assert_array_equal(params[1].grad, grads[1])
    total = clip_grad_norm_(params, 6.5)
    np.testing.assert_equal(total, expected_total)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad, e.grad, rtol=1e-6)
    clamped = params_with_grads([np.array([-2.0, 0.25, 7.0], np.float32)])
    clip_grad_value_(clamped, 0.5)
    np.testing.assert_array_equal(clamped[0].grad, [-0.5, 0.25, 0.5])


@pytest.mark.parametrize("workers", [2, 3])
def test_clipping_over_threads_has_the_same_bits(workers, monkeypatch):
    """The chunk dots are shared out over threads and added back in order: the norm and the
    clipped gradients must not change a bit with the thread count.

    One-element chunks: 1² and then 30 of (2⁻²⁷)² = 2⁻⁵⁴. Added one at a time to 1 each
    2⁻⁵⁴ rounds away (it is under half an ulp of 1), so the squared norm is exactly 1;
    summing the small ones in a block first would carry them into the total.
    """
    from tinysft import threads
    from tinysft.optim import clip
    monkeypatch.setattr(clip, "_CHUNK", 1)
    monkeypatch.setattr(threads, "MIN_PARALLEL", 1)
    rng = np.random.default_rng(7)
    grads = [np.array([1.0] + [2.0 ** -27] * 30, np.float32), rng.standard_normal((13, 7)).astype(np.float32)]
    results = {}
    before = threads.num_threads()
    try:
        for count in (1, workers):
            threads.set_num_threads(count)
            small, params = params_with_grads(grads[:1]), params_with_grads(grads)
            results[count] = clip_grad_norm_(small, 0.5), clip_grad_norm_(params, 1.0), [p.grad for p in params]
    finally:
        threads.set_num_threads(before)
    (small_one, norm_one, grads_one), (small_many, norm_many, grads_many) = results[1], results[workers]
    assert small_one == small_many == 1.0
    assert norm_one == norm_many
    for a, b in zip(grads_one, grads_many):
        np.testing.assert_array_equal(a, b)
