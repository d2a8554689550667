"""The attention and pooling ops of tinysft.functional: values against NumPy, gradchecks."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import functional as F


def test_attention_bias_values():
    bias = F.attention_bias(np.array([[1, 0]]), np.float32)
    assert bias.shape == (1, 1, 1, 2)
    assert bias.numpy()[0, 0, 0, 0] == 0 and bias.numpy()[0, 0, 0, 1] == np.finfo(np.float32).min
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        F.attention_bias(np.ones(3))


@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 5),
       scale=st.floats(0.1, 2.0), seed=st.integers(0, 2 ** 16))
def test_fused_masked_softmax_matches_composition_and_gradchecks(batch, heads, length, scale, seed):
    """Random (B, H, T, T) scores incl. size-1 axes and T = 1; each row keeps at least its first key."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((batch, heads, length, length))
    mask = (rng.random((batch, length)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    bias = F.attention_bias(mask, np.float64)
    fused = F.scaled_masked_softmax(tinysft.tensor(scores), scale, bias).numpy()
    composed = F.softmax(tinysft.tensor(scores) * scale + bias).numpy()
    np.testing.assert_allclose(fused, composed, atol=1e-12)
    assert (fused[np.broadcast_to(mask[:, None, None, :] == 0, fused.shape)] == 0).all()
    assert tinysft.gradcheck(lambda s: F.scaled_masked_softmax(s, scale, bias), [scores])


def test_mean_pool_ignores_padding_and_cls_pool():
    h = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = F.mean_pool(tinysft.tensor(h), mask).numpy()
    np.testing.assert_allclose(pooled[0], h[0, :2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], h[1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(F.mean_pool(tinysft.tensor(h)).numpy(), h.mean(1), rtol=1e-6)
    np.testing.assert_array_equal(F.cls_pool(tinysft.tensor(h)).numpy(), h[:, 0])
    assert np.isfinite(F.mean_pool(tinysft.tensor(h), np.zeros((2, 4))).numpy()).all()
    assert tinysft.gradcheck(lambda t: F.mean_pool(t, mask), [h.astype(np.float64)])


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(F.l2_normalize(tinysft.tensor(x)).numpy(), [[0.6, 0.8], [0.0, 0.0]])
    assert tinysft.gradcheck(F.l2_normalize, [np.random.default_rng(0).standard_normal((3, 4))])
