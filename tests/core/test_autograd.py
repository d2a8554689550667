"""Autograd semantics: reuse, diamonds, depth, no_grad, accumulation, detach, aliasing, freeing."""
import gc
import time
import weakref

import numpy as np
import pytest

import tinysft
from tinysft import ShapeError, Tensor, no_grad


def leaf(values, device="cpu", dtype=np.float64):
    return tinysft.tensor(np.asarray(values, dtype=dtype), device=device, requires_grad=True)


def grad_of(x):
    return tinysft.tensor(x.grad).numpy()


def test_reused_node_gets_gradient_once_per_use(device):
    a = leaf([1.0, -2.0, 3.0], device)
    (a + a).sum().backward()
    np.testing.assert_array_equal(grad_of(a), [2.0, 2.0, 2.0])

    a = leaf([1.0, -2.0, 3.0], device)
    (a * a).sum().backward()
    np.testing.assert_array_equal(grad_of(a), [2.0, -4.0, 6.0])

    a = leaf([1.0, -2.0, 3.0], device)
    (a * a * a + a).sum().backward()  # 3a² + 1
    np.testing.assert_array_equal(grad_of(a), [4.0, 13.0, 28.0])


def test_diamond_graph(device):
    a = leaf([0.5, 2.0], device)
    b = a * 2.0  # b feeds two branches that meet again
    c, d = b + 1.0, b * 3.0
    (c * d).sum().backward()  # (2a + 1)(6a) = 12a² + 6a → 24a + 6
    np.testing.assert_allclose(grad_of(a), [18.0, 54.0])


def test_wide_fan_out_and_shared_subexpression(device):
    a = leaf([1.5], device)
    shared = a.exp()
    total = shared
    for _ in range(50):
        total = total + shared * 0.5
    total.sum().backward()
    np.testing.assert_allclose(grad_of(a), 26.0 * np.exp(1.5), rtol=1e-14)


def test_chain_of_100k_ops_does_not_hit_recursion_limit():
    a = leaf([1.0])
    x = a
    for _ in range(100_000):
        x = x + 1.0
    started = time.perf_counter()
    x.sum().backward()
    assert time.perf_counter() - started < 30
    np.testing.assert_array_equal(a.grad, [1.0])
    assert x.item() == 100_001.0
    del x  # freeing the 100k-deep graph must not overflow the C stack either


def test_no_grad_records_nothing(device):
    a = leaf([1.0, 2.0], device)
    assert tinysft.is_grad_enabled()
    with no_grad():
        assert not tinysft.is_grad_enabled()
        b = (a * 2.0).exp().sum()
    assert tinysft.is_grad_enabled()
    assert not b.requires_grad and b._parents == () and b.backward_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        b.backward()
    assert a.grad is None


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(KeyError), no_grad():
        raise KeyError("boom")
    assert tinysft.is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not tinysft.is_grad_enabled()  # nesting keeps the outer state
    assert tinysft.is_grad_enabled()


def test_gradients_accumulate_across_backward_calls(device):
    a = leaf([1.0, 2.0], device)
    loss = (a * a).sum()
    loss.backward()
    loss.backward()  # the graph can be replayed; leaves accumulate
    np.testing.assert_array_equal(grad_of(a), [4.0, 8.0])
    (a * 3.0).sum().backward()  # a second graph adds to the same .grad
    np.testing.assert_array_equal(grad_of(a), [7.0, 11.0])


def test_a_graph_is_freed_without_the_cycle_collector():
    """Backward closures never refer to their own output: dropping the loss frees every node at once."""
    from tinysft import functional as F
    rng = np.random.default_rng(0)
    x, w, b = leaf(rng.standard_normal((2, 3, 4))), leaf(rng.standard_normal((4, 4))), leaf(np.zeros(4))
    gc.disable()
    try:
        h = F.layer_norm(F.linear(x, w, b), w[0], b).gelu()  # (2, 3, 4)
        probs = F.scaled_masked_softmax(h @ h.transpose(-1, -2), 0.5)  # (2, 3, 3)
        mixed = F.dropout(F.cat([probs @ h, h], axis=-1), 0.5, generator=np.random.default_rng(0))
        loss = F.cross_entropy(mixed.mean(axis=1), np.array([0, 1])) + mixed.max() + (h * h).sum().sqrt()
        loss.backward()
        nodes = [weakref.ref(t) for t in (h, probs, mixed, loss)]
        del h, probs, mixed, loss
        assert [node() for node in nodes] == [None] * len(nodes)
    finally:
        gc.enable()


def test_intermediate_gradients_are_freed():
    a = leaf([1.0, 2.0])
    b = a * 2.0
    b.sum().backward()
    assert b.grad is None and a.grad is not None


def test_detach_cuts_the_graph_and_shares_memory(device):
    a = leaf([1.0, 2.0], device)
    d = a.detach()
    assert not d.requires_grad and d._parents == ()
    (d * a).sum().backward()  # only the path through ``a`` counts: grad = d
    np.testing.assert_array_equal(grad_of(a), [1.0, 2.0])
    assert d.data is a.data


def test_inputs_without_requires_grad_get_no_gradient(device):
    a, c = leaf([1.0, 2.0], device), tinysft.tensor([3.0, 4.0], device=device)
    (a * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(grad_of(a), [3.0, 4.0])


def test_backward_on_non_scalar_without_gradient_raises_clearly(device):
    a = leaf([[1.0, 2.0]], device)
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(1, 2\).*gradient argument"):
        (a * 2.0).backward()
    with pytest.raises(ShapeError, match=r"gradient of shape \(3,\) for a tensor of shape \(1, 2\)"):
        (a * 2.0).backward(np.ones(3))
    (a * 2.0).backward(np.array([[1.0, 10.0]]))  # with a gradient it is fine
    np.testing.assert_array_equal(grad_of(a), [[2.0, 20.0]])


def test_one_element_non_0d_tensor_needs_no_gradient():
    a = leaf([[3.0]])
    (a * a).backward()
    np.testing.assert_array_equal(a.grad, [[6.0]])


def test_leaf_gradients_are_not_aliased(device):
    a, b = leaf([1.0, 2.0], device), leaf([3.0, 4.0], device)
    c = a + b  # both leaves receive the very same upstream array
    c.backward(np.ones(2))
    a.grad += 100.0  # an optimizer edits gradients in place
    np.testing.assert_array_equal(grad_of(b), [1.0, 1.0])
    assert a.grad is not b.grad


def test_leaf_gradient_does_not_alias_the_users_gradient_or_a_broadcast():
    a = leaf([1.0, 2.0])
    upstream = np.array([5.0, 6.0])
    a.backward(upstream)
    a.grad *= 2.0
    np.testing.assert_array_equal(upstream, [5.0, 6.0])
    b = leaf([[1.0, 2.0], [3.0, 4.0]])
    b.sum().backward()  # sum's backward broadcasts a read-only view
    b.grad += 1.0  # writeable, and owned by b
    np.testing.assert_array_equal(b.grad, 2.0)


def test_gradients_have_the_tensor_dtype(device):
    a32 = leaf([1.0, 2.0], device, dtype=np.float32)
    b64 = leaf([3.0, 4.0], device, dtype=np.float64)
    (a32 * b64).sum().backward()  # promoted to float64 on the way, cast back on accumulation
    assert a32.grad.dtype == np.float32 and b64.grad.dtype == np.float64
    c = leaf([1.0, 2.0], device, dtype=np.float32)
    c.double().sum().backward()
    assert c.grad.dtype == np.float32
    np.testing.assert_array_equal(grad_of(c), [1.0, 1.0])


def test_leaf_backward_directly(device):
    a = leaf([1.0, 2.0], device)
    a.backward(np.array([3.0, 4.0]))
    np.testing.assert_array_equal(grad_of(a), [3.0, 4.0])


def test_graph_keeps_parents_only_when_needed():
    a, c = leaf([1.0]), tinysft.tensor([2.0])
    assert (a * c)._parents and (a * c).requires_grad
    constant = c * c
    assert constant._parents == () and not constant.requires_grad
    assert isinstance(constant, Tensor)


def test_fused_cross_entropy_gradient_survives_replay_and_shared_use():
    # the fused backward hands its gradient buffer on without a copy: nothing may edit it in place
    from tinysft import functional as F
    rng = np.random.default_rng(0)
    w = leaf(rng.standard_normal((4, 5)))
    target = np.array([1, -100, 4, 0])
    z = w * 1.0  # intermediate logits: they receive the buffer itself
    loss = F.cross_entropy(z, target) + F.cross_entropy(z, target, reduction="sum") * 0.5 + z.sum()
    loss.backward()
    once = w.grad.copy()
    loss.backward()
    np.testing.assert_allclose(w.grad, 2 * once, rtol=1e-15)
    w.grad = None
    (F.cross_entropy(w * 1.0, target) * 3.0).backward()  # upstream gradient ≠ 1
    p = np.exp(w.data) / np.exp(w.data).sum(axis=1, keepdims=True)
    onehot = np.zeros((4, 5))
    onehot[[0, 2, 3], [1, 4, 0]] = 1.0
    expected = 3.0 * (p - onehot) / 3
    expected[1] = 0.0
    np.testing.assert_allclose(w.grad, expected, rtol=1e-12, atol=1e-15)
