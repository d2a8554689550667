"""Hypothesis strategies shared by the core tests: small float64 arrays and shapes.

Sizes stay small because gradcheck costs two forward passes per input element.
"""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_SIDE = 3

# for @given tests that also take the ``device`` fixture: it only names a backend, so sharing it
# between examples is safe (the profile's other settings still apply)
with_device = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# shapes with 0–3 dims, every side 1–3 (size-1 dims and N=1 come up often)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=MAX_SIDE)
nonscalar_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=MAX_SIDE)
pairs_of_shapes = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3,
                                                    min_side=1, max_side=MAX_SIDE)

reals = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
positives = st.floats(0.2, 3.0, allow_nan=False, allow_infinity=False)
# |x| >= 0.1: far from the kink of abs/relu and from the pole of 1/x, compared with gradcheck's ε = 1e-6
away_from_zero = st.tuples(st.floats(0.1, 2.0), st.booleans()).map(lambda t: t[0] if t[1] else -t[0])


def arrays(shape, elements=reals):
    """A float64 array of ``shape`` (a shape or a strategy for one)."""
    return hnp.arrays(np.float64, shape, elements=elements)


@st.composite
def distinct_arrays(draw, shape):
    """Values at least 0.15 apart, so max() has no ties within gradcheck's ε."""
    size = int(np.prod(shape))
    order = np.array(draw(st.permutations(range(size))), dtype=np.float64)
    jitter = draw(hnp.arrays(np.float64, size, elements=st.floats(-0.1, 0.1)))
    return ((order - size / 2) * 0.4 + jitter).reshape(shape)


@st.composite
def axes(draw, ndim):
    """None, one axis (maybe negative) or a tuple of distinct axes of an ``ndim``-dim array."""
    if ndim == 0:
        return None
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    negate = draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
    return tuple(a - ndim if flip else a for a, flip in zip(chosen, negate, strict=True))


def reduced_count(shape, axis):
    """How many elements each output of a reduction over ``axis`` sums."""
    if axis is None:
        return int(np.prod(shape))
    axis = (axis,) if isinstance(axis, int) else axis
    return int(np.prod([shape[a] for a in axis]))  # negative axes index from the end
