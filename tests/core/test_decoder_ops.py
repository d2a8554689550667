"""The decoder ops (rms_norm, rope, swiglu, grouped-query attention, causal_mask).

Each op: gradients of every input against central finite differences in float64
(hypothesis shapes with size-1 axes, N = 1, T = 1, S > T, G = 1 and 3, rows with
no allowed key), forward values against a plain float64 reference written here
(per-row and per-head loops, explicit 2×2 rotation matrices), and against
PyTorch when it is installed.
"""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft import ShapeError, gradcheck, no_grad
from tinysft import functional as F

from .strategies import arrays, nonscalar_shapes, with_device

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (the float64 references still apply)")

sides = st.integers(1, 3)
seeds = st.integers(0, 2 ** 16)


def t(x, device="cpu", **kwargs):
    return tinysft.tensor(x, device=device, **kwargs)


# ----- plain float64 references -----
def rms_norm_reference(x, w, eps):
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        row = x[index]
        out[index] = row / math.sqrt(sum(v * v for v in row) / len(row) + eps) * w
    return out


def rotation_reference(x, positions, base):
    """Each pair (x_i, x_{i+D/2}) of every (b, h, t) multiplied by the matrix [[c, −s], [s, c]] of angle p·θ_i."""
    batch, heads, length, dim = x.shape
    half = dim // 2
    positions = np.broadcast_to(np.asarray(positions).reshape(-1, length), (batch, length))
    out = np.empty_like(x)
    for b, h, i in np.ndindex(batch, heads, length):
        for j in range(half):
            angle = positions[b, i] * base ** (-2 * j / dim)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            out[b, h, i, [j, j + half]] = rotation @ x[b, h, i, [j, j + half]]
    return out


def attention_reference(q, k, v, allowed):
    """Per batch, query head and query row: softmax over that row's allowed keys, of kv head h // G."""
    batch, q_heads, length, dim = q.shape
    groups = q_heads // k.shape[1]
    allowed = np.broadcast_to(allowed, (batch, 1, length, k.shape[2]))
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b, h, i in np.ndindex(batch, q_heads, length):
        keys = np.flatnonzero(allowed[b, 0, i])
        if keys.size == 0:
            continue
        scores = np.array([q[b, h, i] @ k[b, h // groups, j] / math.sqrt(dim) for j in keys])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, h, i] = sum(w * v[b, h // groups, j] for w, j in zip(weights, keys))
    return out


def causal_reference(length, keys, key_padding=None, segment_ids=None):
    batch = max(len(a) for a in (key_padding, segment_ids, [0]) if a is not None)
    out = np.zeros((batch, 1, length, keys), bool)
    for b, i, j in np.ndindex(batch, length, keys):
        ok = j <= keys - length + i
        if key_padding is not None:
            ok = ok and bool(key_padding[b][j])
        if segment_ids is not None:
            ok = ok and segment_ids[b][i] == segment_ids[b][j]
        out[b, 0, i, j] = ok
    return out


# ----- drawing attention problems -----
@st.composite
def attention_problems(draw):
    """q, k, v and a boolean mask (or None): G ∈ {1, 3}, S ≥ T, some rows with no allowed key."""
    batch, kv_heads, length, dim, value_dim = (draw(sides) for _ in range(5))
    groups = draw(st.sampled_from([1, 3]))
    keys = length + draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(seeds))
    q = rng.standard_normal((batch, kv_heads * groups, length, dim))
    k = rng.standard_normal((batch, kv_heads, keys, dim))
    v = rng.standard_normal((batch, kv_heads, keys, value_dim))
    kind = draw(st.sampled_from(["none", "causal", "random", "padding"]))
    if kind == "none":
        mask = None
    elif kind == "causal":
        mask = F.causal_mask(length, keys)
    elif kind == "random":  # (B, 1, T, S); about one row in four, and a whole row if drawn, is empty
        mask = rng.random((batch, 1, length, keys)) < 0.6
        mask[:, :, 0] &= draw(st.booleans())
    else:  # (B, 1, 1, S) key padding over a causal mask; may hide every key of some rows
        mask = F.causal_mask(length, keys) & (rng.random((batch, 1, 1, keys)) < 0.7)
    return q, k, v, mask


# ----- rms_norm -----
@given(data=st.data(), shape=nonscalar_shapes, eps=st.sampled_from([1e-5, 0.1]))
def test_rms_norm_gradients(data, shape, eps):
    x = data.draw(arrays(shape))
    w = data.draw(arrays((shape[-1],)))
    assert gradcheck(lambda a, b: F.rms_norm(a, b, eps), [x, w])


@with_device
@given(data=st.data(), shape=nonscalar_shapes)
def test_rms_norm_values(device, data, shape):
    x = data.draw(arrays(shape))
    w = data.draw(arrays((shape[-1],)))
    got = F.rms_norm(t(x, device), t(w, device), 1e-5).numpy()
    np.testing.assert_allclose(got, rms_norm_reference(x, w, 1e-5), rtol=1e-12, atol=1e-12)


def test_rms_norm_of_zeros_is_zero_and_finite():
    x = t(np.zeros((2, 4)), requires_grad=True)
    y = F.rms_norm(x, t(np.ones(4)))
    y.sum().backward()
    assert (y.numpy() == 0).all() and np.isfinite(x.grad).all()


# ----- rope -----
def test_rope_cache_is_the_formula():
    cos, sin = F.rope_cache(np.array([[0, 3, 7]]), 6, 100000.0)
    assert cos.shape == sin.shape == (1, 1, 3, 3) and cos.dtype == sin.dtype == np.float32
    for i, p in enumerate([0, 3, 7]):
        for j in range(3):
            angle = p * 100000.0 ** (-2 * j / 6)
            assert cos[0, 0, i, j] == pytest.approx(math.cos(angle), abs=1e-7)
            assert sin[0, 0, i, j] == pytest.approx(math.sin(angle), abs=1e-7)
    one_row, _ = F.rope_cache(np.arange(5), 4, 10.0)
    per_batch, _ = F.rope_cache(np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), 4, 10.0)
    assert one_row.shape == (1, 1, 5, 2) and per_batch.shape == (2, 1, 5, 2)
    np.testing.assert_array_equal(per_batch[:1], one_row)


@st.composite
def rope_problems(draw):
    batch, heads, length = draw(sides), draw(sides), draw(sides)
    dim = 2 * draw(sides)
    rng = np.random.default_rng(draw(seeds))
    positions = rng.integers(0, 50, (batch, length) if draw(st.booleans()) else (length,))
    return rng.standard_normal((batch, heads, length, dim)), positions


@given(problem=rope_problems())
def test_rope_gradients(problem):
    x, positions = problem
    cos, sin = F.rope_cache(positions, x.shape[-1], 10000.0)
    assert gradcheck(lambda a: F.rope(a, cos, sin), [x])


@with_device
@given(problem=rope_problems())
def test_rope_is_the_rotation_of_each_pair(device, problem):
    x, positions = problem
    cos, sin = F.rope_cache(t(positions, device).data, x.shape[-1], 10000.0)
    got = F.rope(t(x, device), cos, sin).numpy()
    # the tables are float32: their rounding (~6e-8 per entry) bounds the agreement
    np.testing.assert_allclose(got, rotation_reference(x, positions, 10000.0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)


@given(m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 40), seed=seeds)
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, 8))

    def score(i, j):
        cos_i, sin_i = F.rope_cache(np.array([i]), 8, 100.0)
        cos_j, sin_j = F.rope_cache(np.array([j]), 8, 100.0)
        return float((F.rope(t(q), cos_i, sin_i).numpy() * F.rope(t(k), cos_j, sin_j).numpy()).sum())

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-5)
    if m != n:  # and it does depend on it: not the plain dot product
        assert score(m, n) != pytest.approx(float((q * k).sum()), abs=1e-6)


# ----- swiglu -----
@given(data=st.data(), shape=nonscalar_shapes)
def test_swiglu_gradients(data, shape):
    gate = data.draw(arrays(shape, st.floats(-6.0, 6.0)))
    up = data.draw(arrays(shape))
    assert gradcheck(F.swiglu, [gate, up])


@with_device
@given(data=st.data(), shape=nonscalar_shapes)
def test_swiglu_values(device, data, shape):
    gate = data.draw(arrays(shape, st.floats(-30.0, 30.0)))
    up = data.draw(arrays(shape))
    expected = np.vectorize(lambda a, u: a / (1 + math.exp(-a)) * u)(gate, up)
    np.testing.assert_allclose(F.swiglu(t(gate, device), t(up, device)).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_swiglu_saturates_without_overflow():
    gate = t(np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32), requires_grad=True)
    up = t(np.ones(5, dtype=np.float32), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.swiglu(gate, up)
        y.sum().backward()
    np.testing.assert_array_equal(y.numpy(), [0, 0, 0, 100, 1e4])
    np.testing.assert_array_equal(gate.grad, [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(up.grad, [0, 0, 0, 100, 1e4])


# ----- attention -----
@given(problem=attention_problems())
def test_attention_gradients(problem):
    q, k, v, mask = problem
    assert gradcheck(lambda a, b, c: F.attention(a, b, c, mask), [q, k, v])


@with_device
@given(problem=attention_problems())
def test_attention_values(device, problem):
    q, k, v, mask = problem
    got = F.attention(t(q, device), t(k, device), t(v, device), mask).numpy()
    allowed = np.ones((1, 1) + (q.shape[2], k.shape[2]), bool) if mask is None else mask
    np.testing.assert_allclose(got, attention_reference(q, k, v, allowed), rtol=1e-12, atol=1e-12)


def test_attention_rows_without_keys_are_zero_with_zero_gradients():
    rng = np.random.default_rng(0)
    q, k, v = (t(rng.standard_normal(s), requires_grad=True) for s in [(1, 3, 2, 4), (1, 1, 3, 4), (1, 1, 3, 4)])
    mask = np.array([[[[False, False, False], [True, True, False]]]])
    y = F.attention(q, k, v, mask)
    (y * t(rng.standard_normal(y.shape))).sum().backward()
    assert (y.numpy()[:, :, 0] == 0).all() and np.isfinite(y.numpy()).all()
    assert (q.grad[:, :, 0] == 0).all()
    assert (k.grad[:, :, 2] == 0).all() and (v.grad[:, :, 2] == 0).all()  # key 2 is never allowed


@given(problem=attention_problems(), row=st.integers(0, 2))
def test_attention_does_not_leak_the_future(problem, row):
    """With a causal mask, output row i's gradient with respect to keys and values after S − T + i is exactly 0."""
    q, k, v, _ = problem
    length, keys = q.shape[2], k.shape[2]
    row = min(row, length - 1)
    q, k, v = (t(a, requires_grad=True) for a in (q, k, v))
    F.attention(q, k, v, F.causal_mask(length, keys))[:, :, row].sum().backward()
    future = keys - length + row + 1
    assert (k.grad[:, :, future:] == 0).all() and (v.grad[:, :, future:] == 0).all()
    assert (q.grad[:, :, row + 1:] == 0).all()
    assert np.abs(v.grad[:, :, :future]).sum() > 0


@with_device
@given(problem=attention_problems())
def test_attention_with_a_kv_cache_equals_the_last_row(device, problem):
    """One new query (T = 1) against all S keys = the last row of the full causal computation over S."""
    _, k, v, _ = problem
    keys = k.shape[2]
    q = np.random.default_rng(keys).standard_normal((k.shape[0], 2 * k.shape[1], keys, k.shape[3]))
    full = F.attention(t(q, device), t(k, device), t(v, device), F.causal_mask(keys)).numpy()
    step = F.attention(t(q[:, :, -1:], device), t(k, device), t(v, device), F.causal_mask(1, keys)).numpy()
    np.testing.assert_allclose(step, full[:, :, -1:], rtol=1e-12, atol=1e-14)


def test_attention_grouped_heads_equal_repeated_kv_heads():
    """G = 3 query heads per kv head = plain multi-head attention on K, V repeated per query head;
    each kv head's gradient is the sum of its repeats' gradients."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 6, 4, 5)), rng.standard_normal((2, 2, 4, 5)), rng.standard_normal((2, 2, 4, 3))
    mask, upstream = F.causal_mask(4), rng.standard_normal((2, 6, 4, 3))
    grouped = [t(a, requires_grad=True) for a in (q, k, v)]
    repeated = [t(q, requires_grad=True)] + [t(np.repeat(a, 3, axis=1), requires_grad=True) for a in (k, v)]
    outs = [F.attention(*leaves, mask) for leaves in (grouped, repeated)]
    for out in outs:
        out.backward(upstream)
    np.testing.assert_allclose(outs[0].numpy(), outs[1].numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grouped[0].grad, repeated[0].grad, rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(grouped[1:], repeated[1:]):
        np.testing.assert_allclose(mine.grad, theirs.grad.reshape(2, 2, 3, 4, -1).sum(axis=2), rtol=1e-12, atol=1e-14)


def test_attention_takes_heads_transposed_from_tokens():
    """q, k, v as the model makes them: (B, T, H, Dh) projections permuted to (B, H, T, Dh), not contiguous."""
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 3, 6, 4)), rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 3, 2, 4))
    leaves = [t(a, requires_grad=True) for a in (q, k, v)]
    out = F.attention(*(a.permute(0, 2, 1, 3) for a in leaves), F.causal_mask(3))
    out.sum().backward()
    plain = [t(np.ascontiguousarray(a.transpose(0, 2, 1, 3)), requires_grad=True) for a in (q, k, v)]
    expected = F.attention(*plain, F.causal_mask(3))
    expected.sum().backward()
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-12)
    for leaf, reference in zip(leaves, plain):
        np.testing.assert_allclose(leaf.grad, reference.grad.transpose(0, 2, 1, 3), rtol=1e-12, atol=1e-14)


# ----- causal_mask -----
@given(length=st.integers(1, 4), extra=st.integers(0, 3), batch=st.integers(1, 3), seed=seeds,
       padding=st.booleans(), segments=st.booleans())
def test_causal_mask_is_the_definition(length, extra, batch, seed, padding, segments):
    rng = np.random.default_rng(seed)
    keys = length if segments else length + extra
    key_padding = rng.random((batch, keys)) < 0.7 if padding else None
    segment_ids = np.sort(rng.integers(0, 3, (batch, length)), axis=1) if segments else None
    got = F.causal_mask(length, keys, key_padding=key_padding, segment_ids=segment_ids)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, causal_reference(length, keys, key_padding, segment_ids))


def test_causal_mask_rejects_bad_arguments():
    with pytest.raises(ShapeError, match="T=3, S=2"):
        F.causal_mask(3, 2)
    with pytest.raises(ShapeError, match="key_padding .*\\(2, 3\\)"):
        F.causal_mask(4, key_padding=np.ones((2, 3), bool))
    with pytest.raises(ShapeError, match="segment_ids .*S = T"):
        F.causal_mask(2, 3, segment_ids=np.zeros((1, 2), int))
    with pytest.raises(ShapeError, match="disagree on B"):
        F.causal_mask(2, key_padding=np.ones((2, 2), bool), segment_ids=np.zeros((3, 2), int))


# ----- the ops together: dtypes, no_grad, bad input -----
def _all_ops(dtype, requires_grad):
    rng = np.random.default_rng(0)

    def leaf(*shape):  # float32-representable values in either dtype
        return t(rng.standard_normal(shape).astype(np.float32).astype(dtype), requires_grad=requires_grad)

    x, w, q, k, v = leaf(2, 3, 8), leaf(8), leaf(1, 3, 3, 4), leaf(1, 1, 3, 4), leaf(1, 1, 3, 4)
    cos, sin = F.rope_cache(np.arange(3), 4, 10000.0)
    outs = [F.rms_norm(x, w), F.swiglu(x, x * 2.0), F.rope(q, cos, sin), F.attention(q, k, v, F.causal_mask(3))]
    return outs, [x, w, q, k, v]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_in_values_and_gradients(dtype):
    outs, leaves = _all_ops(dtype, requires_grad=True)
    assert [o.dtype for o in outs] == [dtype] * 4
    sum(o.sum() for o in outs).backward()
    assert [leaf.grad.dtype for leaf in leaves] == [dtype] * 5


def test_float32_agrees_with_float64():
    """The same (float32-representable) inputs in both dtypes: values and gradients within float32 rounding."""
    runs = []
    for dtype in (np.float32, np.float64):
        outs, leaves = _all_ops(dtype, requires_grad=True)
        sum((o * float(i + 1)).sum() for i, o in enumerate(outs)).backward()
        runs.append([o.numpy() for o in outs] + [leaf.grad for leaf in leaves])
    for single, double in zip(*runs):
        np.testing.assert_allclose(single, double, rtol=2e-5, atol=2e-6 * np.abs(double).max())


def test_no_grad_keeps_no_graph():
    with no_grad():
        outs, _ = _all_ops(np.float32, requires_grad=True)
    assert not any(o.requires_grad or o._parents or o.backward_fn for o in outs)


def test_bad_shapes_name_the_problem():
    x = t(np.zeros((1, 2, 3, 4)))
    cos, sin = F.rope_cache(np.arange(3), 4, 10000.0)
    with pytest.raises(ShapeError, match="rms_norm: weight of shape \\(3,\\) for input of shape \\(1, 2, 3, 4\\)"):
        F.rms_norm(x, t(np.ones(3)))
    with pytest.raises(ShapeError, match="rope: .*D even"):
        F.rope(t(np.zeros((1, 2, 3, 5))), cos, sin)
    with pytest.raises(ShapeError, match="rope: tables of shape \\(1, 1, 3, 2\\) do not fit x of shape \\(1, 2, 4, 4\\)"):
        F.rope(t(np.zeros((1, 2, 4, 4))), cos, sin)
    with pytest.raises(ShapeError, match="rope_cache: dim"):
        F.rope_cache(np.arange(3), 5, 10000.0)
    with pytest.raises(ShapeError, match="swiglu: gate of shape \\(2,\\) and up of shape \\(3,\\)"):
        F.swiglu(t(np.zeros(2)), t(np.zeros(3)))
    with pytest.raises(ShapeError, match="attention: .*Hq a multiple of Hkv; got q \\(1, 2, 3, 4\\), k \\(1, 3, 3, 4\\)"):
        F.attention(x, t(np.zeros((1, 3, 3, 4))), t(np.zeros((1, 3, 3, 4))))
    with pytest.raises(ShapeError, match="mask of shape \\(1, 1, 3, 2\\) does not broadcast to .*\\(1, 1, 3, 3\\)"):
        F.attention(x, x[:, :1], x[:, :1], np.ones((1, 1, 3, 2), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        F.attention(x, x, x, np.ones((3, 3)))


# ----- against PyTorch (and Hugging Face's Llama rotary code) where installed -----
@needs_torch
def test_matches_torch():
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, 5, 16)), rng.standard_normal(16)
    np.testing.assert_allclose(F.rms_norm(t(x), t(w)).numpy(),
                               torch.nn.functional.rms_norm(torch.tensor(x), (16,), torch.tensor(w), 1e-5).numpy(),
                               rtol=1e-12, atol=1e-12)
    gate, up = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))
    np.testing.assert_allclose(F.swiglu(t(gate), t(up)).numpy(),
                               (torch.nn.functional.silu(torch.tensor(gate)) * torch.tensor(up)).numpy(), rtol=1e-12)
    q, k, v = rng.standard_normal((2, 6, 4, 8)), rng.standard_normal((2, 2, 7, 8)), rng.standard_normal((2, 2, 7, 8))
    mask = F.causal_mask(4, 7, key_padding=rng.random((2, 7)) < 0.8) | np.eye(4, 7, 3, dtype=bool)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k).repeat_interleave(3, 1), torch.tensor(v).repeat_interleave(3, 1),
        attn_mask=torch.tensor(mask))
    np.testing.assert_allclose(F.attention(t(q), t(k), t(v), mask).numpy(), theirs.numpy(), rtol=1e-10, atol=1e-12)


@needs_torch
def test_rope_matches_hugging_face_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                reason="transformers is not installed")
    rng = np.random.default_rng(8)
    q, k = rng.standard_normal((2, 3, 5, 8)), rng.standard_normal((2, 1, 5, 8))
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    angles = positions[..., None] * 100000.0 ** (-np.arange(0, 8, 2) / 8)  # (B, T, D/2), HF duplicates the halves
    emb = torch.tensor(np.concatenate([angles, angles], axis=-1))
    q_hf, k_hf = llama.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k), emb.cos(), emb.sin())
    cos, sin = F.rope_cache(positions, 8, 100000.0)
    np.testing.assert_allclose(F.rope(t(q), cos, sin).numpy(), q_hf.numpy(), atol=1e-6)
    np.testing.assert_allclose(F.rope(t(k), cos, sin).numpy(), k_hf.numpy(), atol=1e-6)
