"""The attention, pooling and threaded encoder ops of tinysft.functional: values against NumPy or the
composition of primitives, gradchecks, and the same bits at every thread count."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import threads
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


def composed_attention(q, k, v, bias, dropout_p, seed):
    """The reference: q @ kᵀ → scaled_masked_softmax → dropout → @ v, from the primitives."""
    probs = F.scaled_masked_softmax(q @ k.transpose(-1, -2), 1.0 / np.sqrt(q.shape[-1]), bias)
    return F.dropout(probs, dropout_p, seed is not None, np.random.default_rng(seed)) @ v


@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 4), keys=st.integers(1, 4),
       head_dim=st.integers(1, 3), value_dim=st.integers(1, 3), dropout_p=st.sampled_from([0.0, 0.3, 1.0]),
       bias_kind=st.sampled_from(["none", "padding", "full"]), seed=st.integers(0, 2 ** 16))
def test_fused_attention_matches_the_composition_and_gradchecks(batch, heads, length, keys, head_dim, value_dim,
                                                                dropout_p, bias_kind, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((batch, heads, length, head_dim)), rng.standard_normal((batch, heads, keys, head_dim))
    v = rng.standard_normal((batch, heads, keys, value_dim))
    bias = {"none": None, "full": rng.standard_normal((1, heads, length, keys)),
            "padding": F.attention_bias(rng.integers(0, 2, (batch, keys)), np.float64)}[bias_kind]

    def fused(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, bias, dropout_p, True, np.random.default_rng(seed))

    inputs = [tinysft.tensor(a, requires_grad=True) for a in (q, k, v)]
    reference = [tinysft.tensor(a, requires_grad=True) for a in (q, k, v)]
    upstream = rng.standard_normal((batch, heads, length, value_dim))
    ours, theirs = fused(*inputs), composed_attention(*reference, bias, dropout_p, seed)
    ours.backward(upstream), theirs.backward(upstream)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-12, atol=1e-12)
    for mine, want in zip(inputs, reference):
        np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-12, atol=1e-12)
    assert tinysft.gradcheck(fused, [q, k, v])


def test_fused_attention_in_eval_mode_ignores_dropout_and_refuses_bad_shapes():
    rng = np.random.default_rng(0)
    q, k, v = (tinysft.tensor(rng.standard_normal((2, 3, 4, 5))) for _ in range(3))
    np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy(),
                               composed_attention(q, k, v, None, 0.0, None).numpy(), rtol=1e-12)
    with pytest.raises(tinysft.ShapeError, match=r"need q \(B, H, T, d\)"):
        F.scaled_dot_product_attention(q, k[:, :2], v)
    with pytest.raises(tinysft.ShapeError, match="bias of shape"):
        F.scaled_dot_product_attention(q, k, v, np.zeros((2, 1, 1, 3)))


@pytest.fixture
def thread_counts():
    """Runs the test body's function at 1, 2 and 3 threads (restoring the count after)."""
    before = threads.num_threads()

    def run(fn):
        results = []
        for count in (1, 2, 3):
            threads.set_num_threads(count)
            results.append(fn())
        return results

    yield run
    threads.set_num_threads(before)


def attention_step():
    """Output and gradients of a float32 attention large enough to be split over threads."""
    rng = np.random.default_rng(0)
    q, k, v = (tinysft.tensor(rng.standard_normal((8, 4, 48, 16)).astype(np.float32), requires_grad=True)
               for _ in range(3))
    bias = F.attention_bias((rng.random((8, 48)) < 0.8).astype(np.int64))
    out = F.scaled_dot_product_attention(q, k, v, bias, 0.1, True, np.random.default_rng(1))
    out.backward(rng.standard_normal(out.shape).astype(np.float32))
    return [out.numpy(), q.grad, k.grad, v.grad]


def layer_norm_step():
    rng = np.random.default_rng(0)
    x = tinysft.tensor(rng.standard_normal((300, 384)).astype(np.float32), requires_grad=True)
    w, b = (tinysft.tensor(rng.standard_normal(384).astype(np.float32), requires_grad=True) for _ in range(2))
    out = F.layer_norm(x, w, b)
    out.backward(rng.standard_normal(out.shape).astype(np.float32))
    return [out.numpy(), x.grad, w.grad, b.grad]


def gelu_step():
    x = tinysft.tensor(np.random.default_rng(0).standard_normal((100, 1536)).astype(np.float32), requires_grad=True)
    out = F.gelu(x)
    out.backward(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32))
    return [out.numpy(), x.grad]


def linear_step():
    rng = np.random.default_rng(0)
    x = tinysft.tensor(rng.standard_normal((300, 64)).astype(np.float32), requires_grad=True)
    w = tinysft.tensor(rng.standard_normal((384, 64)).astype(np.float32), requires_grad=True)
    b = tinysft.tensor(rng.standard_normal(384).astype(np.float32), requires_grad=True)
    out = F.linear(x, w, b)
    out.backward(rng.standard_normal(out.shape).astype(np.float32))
    return [out.numpy(), x.grad, w.grad, b.grad]


@pytest.mark.parametrize("step", [attention_step, layer_norm_step, gelu_step, linear_step])
def test_threaded_ops_give_the_same_bits_at_every_thread_count(step, thread_counts):
    """Each op's non-BLAS work is split over row (or column, or chunk) blocks; every value is computed as in one call."""
    first, *others = thread_counts(step)
    for other in others:
        for a, b in zip(first, other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", [lambda x: F.gelu(x), lambda x: F.gelu(x, "tanh"),
                                lambda x: F.layer_norm(x, tinysft.tensor(np.linspace(0.5, 2.0, 384, dtype=np.float32)),
                                                       tinysft.tensor(np.linspace(-1.0, 1.0, 384, dtype=np.float32))),
                                lambda x: F.layer_norm(x)])
def test_without_a_graph_the_ops_keep_less_and_give_the_same_values(op):
    """Under no_grad GELU keeps no Φ and layer_norm writes y over x̂: the values must not change."""
    x = np.random.default_rng(0).standard_normal((300, 384)).astype(np.float32)
    with_graph = op(tinysft.tensor(x, requires_grad=True)).numpy()
    with tinysft.no_grad():
        np.testing.assert_array_equal(op(tinysft.tensor(x, requires_grad=True)).numpy(), with_graph)
