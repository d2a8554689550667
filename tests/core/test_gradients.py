"""Every differentiable op against central finite differences in float64 (tinysft.gradcheck).

Shapes come from hypothesis: broadcasting, size-1 dims, 0-d and 1-D operands,
N = 1. Inputs avoid kinks (abs, relu), poles (1/x, log) and ties (max).
"""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinysft
from tinysft import functional as F
from tinysft import gradcheck

from .strategies import (
    MAX_SIDE,
    arrays,
    away_from_zero,
    axes,
    distinct_arrays,
    nonscalar_shapes,
    pairs_of_shapes,
    positives,
    reals,
    reduced_count,
    shapes,
)

# ----- + − × ÷ -----
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


@pytest.mark.parametrize("op", BINARY)
@given(data=st.data(), shapes_=pairs_of_shapes)
def test_binary_tensor_tensor_broadcasting(op, data, shapes_):
    a = data.draw(arrays(shapes_.input_shapes[0]))
    b = data.draw(arrays(shapes_.input_shapes[1], away_from_zero if op == "div" else reals))
    assert gradcheck(BINARY[op], [a, b])


@pytest.mark.parametrize("op", BINARY)
@given(data=st.data(), shape=shapes, scalar=away_from_zero)
def test_binary_tensor_scalar(op, data, shape, scalar):
    a = data.draw(arrays(shape))
    assert gradcheck(lambda x: BINARY[op](x, scalar), [a])


@pytest.mark.parametrize("op", BINARY)
@given(data=st.data(), shape=shapes, scalar=reals)
def test_binary_scalar_tensor(op, data, shape, scalar):
    a = data.draw(arrays(shape, away_from_zero if op == "div" else reals))
    assert gradcheck(lambda x: BINARY[op](scalar, x), [a])


# ----- elementwise unary -----
UNARY = {  # name: (function, elements it is smooth on)
    "neg": (lambda x: -x, reals),
    "exp": (lambda x: x.exp(), reals),
    "log": (lambda x: x.log(), positives),
    "sqrt": (lambda x: x.sqrt(), positives),
    "abs": (lambda x: x.abs(), away_from_zero),
    "tanh": (lambda x: x.tanh(), reals),
    "sigmoid": (lambda x: x.sigmoid(), reals),
    "relu": (lambda x: x.relu(), away_from_zero),
    "gelu": (lambda x: x.gelu(), st.floats(-4.0, 4.0)),
    "gelu_tanh": (lambda x: x.gelu("tanh"), st.floats(-4.0, 4.0)),
    "F.relu": (F.relu, away_from_zero),
    "F.gelu": (F.gelu, reals),
    "F.sigmoid": (F.sigmoid, reals),
    "F.tanh": (F.tanh, reals),
}


@pytest.mark.parametrize("op", UNARY)
@given(data=st.data(), shape=shapes)
def test_unary(op, data, shape):
    fn, elements = UNARY[op]
    assert gradcheck(fn, [data.draw(arrays(shape, elements))])


@given(data=st.data(), shape=shapes, exponent=st.sampled_from([0, 1, 2, 3, -1, -2, 0.5, -0.5, 1.5, 2.5, 1 / 3]))
def test_pow_scalar_exponent(data, shape, exponent):
    integral = float(exponent).is_integer()
    x = data.draw(arrays(shape, away_from_zero if integral else positives))
    assert gradcheck(lambda t: t ** exponent, [x])


# ----- matmul -----
@given(data=st.data(), batch=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=MAX_SIDE),
       m=st.integers(1, 3), k=st.integers(1, 3), n=st.integers(1, 3),
       a_vector=st.booleans(), b_vector=st.booleans())
def test_matmul_batched_broadcasting_and_vectors(data, batch, m, k, n, a_vector, b_vector):
    a_shape = (k,) if a_vector else batch.input_shapes[0] + (m, k)
    b_shape = (k,) if b_vector else batch.input_shapes[1] + (k, n)
    a, b = data.draw(arrays(a_shape)), data.draw(arrays(b_shape))
    assert gradcheck(lambda x, y: x @ y, [a, b])


@given(data=st.data(), k=st.integers(1, 3), n=st.integers(1, 3))
def test_matmul_with_constant_operand(data, k, n):
    a, b = data.draw(arrays((2, k))), data.draw(arrays((k, n)))
    assert gradcheck(lambda x: x @ b, [a])  # a Tensor @ ndarray
    assert gradcheck(lambda y: a @ y, [b])  # ndarray @ Tensor goes through __rmatmul__


@given(data=st.data(), lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=MAX_SIDE),
       k=st.integers(1, 3), n=st.integers(1, 3), with_bias=st.booleans())
def test_linear(data, lead, k, n, with_bias):
    """F.linear's fused backward: x (..., k) incl. a single row and a bare vector, W (n, k), b (n,)."""
    inputs = [data.draw(arrays(lead + (k,))), data.draw(arrays((n, k)))]
    if with_bias:
        inputs.append(data.draw(arrays((n,))))
    assert gradcheck(F.linear, inputs)


# ----- reductions -----
@pytest.mark.parametrize("op", ["sum", "mean"])
@given(data=st.data(), shape=shapes, keepdims=st.booleans())
def test_sum_mean(op, data, shape, keepdims):
    axis = data.draw(axes(len(shape)))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: getattr(t, op)(axis=axis, keepdims=keepdims), [x])


@given(data=st.data(), shape=shapes, keepdims=st.booleans())
def test_max(data, shape, keepdims):
    axis = data.draw(axes(len(shape)))
    x = data.draw(distinct_arrays(shape))
    assert gradcheck(lambda t: t.max(axis=axis, keepdims=keepdims), [x])


@given(data=st.data(), shape=nonscalar_shapes, keepdims=st.booleans(), correction=st.sampled_from([0, 1]))
def test_var(data, shape, keepdims, correction):
    axis = data.draw(axes(len(shape)))
    assume(reduced_count(shape, axis) > correction)
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t.var(axis=axis, keepdims=keepdims, correction=correction), [x])


# ----- shape ops -----
@given(data=st.data(), shape=shapes)
def test_reshape(data, shape):
    size = int(np.prod(shape))
    target = data.draw(st.sampled_from([(-1,), (size,), (1, size), tuple(reversed(shape)), (1,) + shape, ()
                                        if size == 1 else (size, 1)]))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t.reshape(target), [x])
    assert gradcheck(lambda t: t.view(*target), [x])


@given(data=st.data(), shape=nonscalar_shapes)
def test_permute_transpose_T(data, shape):
    order = tuple(data.draw(st.permutations(range(len(shape)))))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t.permute(order), [x])
    assert gradcheck(lambda t: t.T, [x])
    if len(shape) >= 2:
        d0, d1 = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=2, max_size=2))
        assert gradcheck(lambda t: t.transpose(d0, d1), [x])


@given(data=st.data(), shape=nonscalar_shapes)
def test_getitem_basic_indices(data, shape):
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t[index], [x])


@given(data=st.data(), shape=nonscalar_shapes)
def test_getitem_integer_arrays_with_repeats_scatter_add(data, shape):
    index = data.draw(hnp.integer_array_indices(shape, result_shape=hnp.array_shapes(max_dims=2, max_side=4)))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t[index], [x])
    # repeats along the first axis, mixed with a slice: the gradient sums over the repeats
    rows = np.array(data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=6)))
    assert gradcheck(lambda t: t[rows], [x])
    assert gradcheck(lambda t: t[rows, ...] * 2.0, [x])
    if len(shape) >= 2:
        cols = np.array(data.draw(st.lists(st.integers(0, shape[1] - 1), min_size=1, max_size=5)))
        assert gradcheck(lambda t: t[:, cols], [x])


@given(data=st.data(), shape=nonscalar_shapes)
def test_getitem_boolean_mask(data, shape):
    mask = data.draw(hnp.arrays(np.bool_, shape))
    x = data.draw(arrays(shape))
    assert gradcheck(lambda t: t[mask], [x])


@given(data=st.data(), shape=nonscalar_shapes, count=st.integers(1, 3))
def test_cat_and_stack(data, shape, count):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    pieces = []
    for _ in range(count):  # equal except along ``axis``
        own = list(shape)
        own[axis] = data.draw(st.integers(1, MAX_SIDE))
        pieces.append(data.draw(arrays(tuple(own))))
    assert gradcheck(lambda *ts: F.cat(ts, axis=axis), pieces)
    assert gradcheck(lambda *ts: F.concatenate(ts, axis=axis), pieces)
    stack_axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    same = [data.draw(arrays(shape)) for _ in range(count)]
    assert gradcheck(lambda *ts: F.stack(ts, axis=stack_axis), same)


@given(data=st.data(), shapes_=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3,
                                                                 max_side=MAX_SIDE))
def test_where_broadcasting(data, shapes_):
    cond_shape, a_shape, b_shape = shapes_.input_shapes
    cond = data.draw(hnp.arrays(np.bool_, cond_shape))
    a, b = data.draw(arrays(a_shape)), data.draw(arrays(b_shape))
    assert gradcheck(lambda x, y: F.where(cond, x, y), [a, b])
    assert gradcheck(lambda x: F.where(cond, x, 0.5), [a])
    assert gradcheck(lambda y: F.where(cond, -1.0, y), [b])


@given(data=st.data(), shapes_=pairs_of_shapes, fill=reals)
def test_masked_fill(data, shapes_, fill):
    x_shape, mask_shape = shapes_.input_shapes
    assume(np.broadcast_shapes(x_shape, mask_shape) == x_shape)  # the mask broadcasts to x
    mask = data.draw(hnp.arrays(np.bool_, mask_shape))
    x = data.draw(arrays(x_shape))
    assert gradcheck(lambda t: F.masked_fill(t, mask, fill), [x])


# ----- softmax family and normalisation -----
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "Tensor.softmax", "Tensor.log_softmax"])
@given(data=st.data(), shape=nonscalar_shapes)
def test_softmax_family(op, data, shape):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, st.floats(-5.0, 5.0)))
    if op.startswith("Tensor."):
        name = op.split(".")[1]
        fn = lambda t: getattr(t, name)(axis)
    else:
        fn = lambda t: getattr(F, op)(t, axis=axis)
    assert gradcheck(fn, [x])


@given(data=st.data(), shape=nonscalar_shapes, affine=st.sampled_from(["none", "weight", "bias", "both"]))
def test_layer_norm(data, shape, affine):
    width = shape[-1]
    inputs = [data.draw(arrays(shape))]
    if affine in ("weight", "both"):
        inputs.append(data.draw(arrays((width,))))
    if affine in ("bias", "both"):
        inputs.append(data.draw(arrays((width,))))

    def fn(x, *params):
        weight = params[0] if affine in ("weight", "both") else None
        bias = params[-1] if affine in ("bias", "both") else None
        return F.layer_norm(x, weight, bias)

    assert gradcheck(fn, inputs)


# ----- lookups and noise -----
@given(data=st.data(), vocab=st.integers(1, 4), dim=st.integers(1, 3),
       ids_shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
def test_embedding_repeats_scatter_add(data, vocab, dim, ids_shape):
    ids = data.draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, vocab - 1)))
    weight = data.draw(arrays((vocab, dim)))
    assert gradcheck(lambda w: F.embedding(w, ids), [weight])


@given(data=st.data(), vocab=st.integers(1, 4), dim=st.integers(1, 3),
       ids_shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
def test_embedding_padding_row_gets_no_gradient(data, vocab, dim, ids_shape):
    """The fused padding-aware lookup: the gradient of every other row is the finite-difference one
    (gradcheck with the pad row held constant), and the pad row's is exactly 0 (against the same lookup
    built from primitives, with where() cutting the pad row from the graph)."""
    ids = data.draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, vocab - 1)))
    pad = data.draw(st.integers(0, vocab - 1))
    weight = data.draw(arrays((vocab, dim)))
    kept = np.arange(vocab) != pad  # (V,)

    def with_pad_row_constant(w, lookup=F.embedding):
        return lookup(F.where(kept[:, None], w, weight), ids)

    assert gradcheck(lambda w: with_pad_row_constant(w, lambda t, i: F.embedding(t, i, padding_idx=pad)), [weight])
    w = tinysft.tensor(weight, requires_grad=True)
    F.embedding(w, ids, padding_idx=pad).sum().backward()
    reference = tinysft.tensor(weight, requires_grad=True)
    with_pad_row_constant(reference).sum().backward()
    np.testing.assert_array_equal(w.grad, reference.grad)


@given(data=st.data(), shape=shapes, p=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_dropout_fixed_generator(data, shape, p, seed):
    x = data.draw(arrays(shape))
    fn = lambda t: F.dropout(t, p, generator=np.random.default_rng(seed))
    assert gradcheck(fn, [x])
    assert gradcheck(lambda t: F.dropout(t, p, training=False), [x])


# ----- losses -----
@st.composite
def classification(draw, ignore_index=-100):
    """(logits, targets, ignore_index): [*lead, C] logits and [*lead] class ids, some ignored."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    classes = draw(st.integers(1, 4))
    logits = draw(arrays(lead + (classes,), st.floats(-4.0, 4.0)))
    ignore = draw(st.sampled_from([-100, -1, classes]))
    target = draw(hnp.arrays(np.int64, lead, elements=st.one_of(st.integers(0, classes - 1), st.just(ignore))))
    return logits, target, ignore


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(case=classification(), smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_cross_entropy(reduction, case, smoothing):
    logits, target, ignore = case
    if reduction == "mean":
        assume((target != ignore).any())  # an all-ignored mean is NaN (tested in test_values)
    assert gradcheck(lambda x: F.cross_entropy(x, target, ignore_index=ignore, label_smoothing=smoothing,
                                               reduction=reduction), [logits])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(case=classification(), z_loss=st.sampled_from([1e-3, 0.1, 1.0]))
def test_cross_entropy_z_loss(reduction, case, z_loss):
    logits, target, ignore = case
    if reduction == "mean":
        assume((target != ignore).any())
    assert gradcheck(lambda x: F.cross_entropy(x, target, ignore_index=ignore, reduction=reduction,
                                               z_loss=z_loss), [logits])
    # the value: the plain loss plus z·lse² on each kept row (lse by NumPy's logaddexp)
    lse = np.logaddexp.reduce(logits, axis=-1)  # (...)
    kept = target != ignore
    plain = F.cross_entropy(tinysft.tensor(logits), target, ignore_index=ignore, reduction="none").numpy()
    with_z = F.cross_entropy(tinysft.tensor(logits), target, ignore_index=ignore, reduction="none",
                             z_loss=z_loss).numpy()
    np.testing.assert_allclose(with_z, plain + np.where(kept, z_loss * lse ** 2, 0.0), rtol=1e-12, atol=1e-12)


def test_cross_entropy_rejects_a_negative_z_loss():
    with pytest.raises(ValueError, match="z_loss"):
        F.cross_entropy(tinysft.tensor([[1.0, 2.0]]), [0], z_loss=-1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(data=st.data(), shape=shapes)
def test_mse_loss(reduction, data, shape):
    a, b = data.draw(arrays(shape)), data.draw(arrays(shape))
    assert gradcheck(lambda x, y: F.mse_loss(x, y, reduction=reduction), [a, b])
    assert gradcheck(lambda x: F.mse_loss(x, b, reduction=reduction), [a])  # ndarray target


# ----- a composite: an MLP-ish expression touching many ops at once -----
@given(data=st.data(), n=st.integers(1, 3), d=st.integers(1, 3))
def test_composite_expression(data, n, d):
    x, w, b = data.draw(arrays((n, d))), data.draw(arrays((d, d))), data.draw(arrays((d,)))
    target = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, d - 1)))

    def fn(x, w, b):
        h = F.layer_norm(x @ w + b, w[0], None).gelu("tanh")
        return F.cross_entropy(h * h.sigmoid() - h.mean(axis=0), target)

    assert gradcheck(fn, [x, w, b])
