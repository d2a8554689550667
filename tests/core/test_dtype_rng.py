"""dtypes (float32 by default, float64 kept, gradients in the tensor's dtype) and seeded randomness."""
import numpy as np
import pytest

import tinysft
from tinysft import functional as F


def test_python_data_defaults_to_float32(device):
    assert tinysft.tensor([1.0, 2.0], device=device).dtype == np.float32
    assert tinysft.tensor(1.5, device=device).dtype == np.float32
    assert tinysft.tensor([[1, 2.5]], device=device).dtype == np.float32
    assert tinysft.tensor([1, 2], device=device).dtype == np.int64  # integers stay integers (class ids)
    assert tinysft.tensor([1.0], dtype=np.float64, device=device).dtype == np.float64


def test_arrays_keep_their_dtype(device):
    assert tinysft.tensor(np.ones(2), device=device).dtype == np.float64
    assert tinysft.tensor(np.ones(2, dtype=np.float32), device=device).dtype == np.float32
    assert tinysft.tensor(np.ones(2), dtype=np.float32, device=device).dtype == np.float32
    assert tinysft.tensor(tinysft.tensor(np.ones(2)), device=device).dtype == np.float64
    assert tinysft.zeros(2, 3, device=device).dtype == np.float32
    assert tinysft.ones((2, 3), dtype=np.float64, device=device).shape == (2, 3)


OPS = {  # every op with its Python-float constants: the result must keep the input's dtype
    "add": lambda x: x + 1.5, "rsub": lambda x: 2.0 - x, "mul": lambda x: x * 0.1, "div": lambda x: x / 3.0,
    "rdiv": lambda x: 1.0 / (x + 5.0), "pow": lambda x: (x + 5.0) ** 1.5, "neg": lambda x: -x,
    "exp": lambda x: x.exp(), "log": lambda x: (x + 5.0).log(), "sqrt": lambda x: (x + 5.0).sqrt(),
    "abs": lambda x: x.abs(), "tanh": lambda x: x.tanh(), "sigmoid": lambda x: x.sigmoid(),
    "relu": lambda x: x.relu(), "gelu": lambda x: x.gelu(), "gelu_tanh": lambda x: x.gelu("tanh"),
    "matmul": lambda x: x @ x.T, "sum": lambda x: x.sum(0), "mean": lambda x: x.mean(), "max": lambda x: x.max(1),
    "var": lambda x: x.var(1), "reshape": lambda x: x.reshape(-1), "T": lambda x: x.T, "getitem": lambda x: x[0, 1:],
    "cat": lambda x: F.cat([x, x], 1), "stack": lambda x: F.stack([x, x]),
    "where": lambda x: F.where(x.data > 0, x, 0.5), "masked_fill": lambda x: F.masked_fill(x, x.data > 0, -1e4),
    "softmax": lambda x: F.softmax(x), "log_softmax": lambda x: F.log_softmax(x),
    "layer_norm": lambda x: F.layer_norm(x), "embedding": lambda x: F.embedding(x, np.array([0, 1, 1])),
    "dropout": lambda x: F.dropout(x, 0.3), "cross_entropy": lambda x: F.cross_entropy(x, np.array([0, 2])),
    "cross_entropy_smooth": lambda x: F.cross_entropy(x, np.array([0, -100]), label_smoothing=0.1),
    "mse_loss": lambda x: F.mse_loss(x, 0.5 * x.detach() + 1.0),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", OPS)
def test_ops_keep_dtype_and_gradients_have_the_tensor_dtype(device, op, dtype):
    x = tinysft.tensor(np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=dtype), device=device,
                       requires_grad=True)
    out = OPS[op](x)
    assert out.dtype == dtype, f"{op} turned {np.dtype(dtype).name} into {out.dtype}"
    out.sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape


def test_manual_seed_repeats_randn(device):
    tinysft.manual_seed(42)
    first = tinysft.randn(3, 4, device=device).numpy()
    more = tinysft.randn(5, device=device).numpy()
    tinysft.manual_seed(42)
    np.testing.assert_array_equal(tinysft.randn(3, 4, device=device).numpy(), first)
    np.testing.assert_array_equal(tinysft.randn(5, device=device).numpy(), more)
    tinysft.manual_seed(43)
    assert not np.array_equal(tinysft.randn(3, 4, device=device).numpy(), first)


def test_randn_dtype_shape_and_generator():
    x = tinysft.randn((2, 3), requires_grad=True)
    assert x.dtype == np.float32 and x.shape == (2, 3) and x.requires_grad
    assert tinysft.randn(4, dtype=np.float64).dtype == np.float64
    a = tinysft.randn(6, generator=np.random.default_rng(5)).numpy()
    b = tinysft.randn(6, generator=np.random.default_rng(5)).numpy()
    np.testing.assert_array_equal(a, b)
    draws = tinysft.randn(100_000, dtype=np.float64).numpy()
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1) < 0.02


def test_rng_state_round_trip():
    tinysft.manual_seed(0)
    state = tinysft.get_rng_state()
    first = tinysft.randn(8).numpy()
    tinysft.randn(3)
    tinysft.set_rng_state(state)
    np.testing.assert_array_equal(tinysft.randn(8).numpy(), first)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [0, 1, 65535, 65536, 65537, 200001, (3, 70001)])
@pytest.mark.parametrize("earlier_float32_draws", [0, 1, 2])  # 1: a kept high half waits in the state
def test_uniforms_over_threads_are_numpys_sequential_draws(workers, dtype, shape, earlier_float32_draws):
    """rng.uniform_at_least gives generator.random(shape, dtype) >= p bit for bit, and leaves the
    generator in the state the sequential draw leaves (the next draws agree too)."""
    from tinysft import threads
    from tinysft.rng import uniform_at_least
    ours, numpys = np.random.default_rng(5), np.random.default_rng(5)
    ours.random(earlier_float32_draws, dtype=np.float32)
    numpys.random(earlier_float32_draws, dtype=np.float32)
    before = threads.num_threads()
    try:
        threads.set_num_threads(workers)
        keep = uniform_at_least(ours, shape, dtype, 0.3)
    finally:
        threads.set_num_threads(before)
    expected = numpys.random(shape, dtype=dtype) >= 0.3
    assert keep.shape == expected.shape and keep.dtype == bool
    np.testing.assert_array_equal(keep, expected)
    assert ours.bit_generator.state == numpys.bit_generator.state
    np.testing.assert_array_equal(ours.random(3, dtype=np.float32), numpys.random(3, dtype=np.float32))


def test_uniforms_of_other_generators_are_drawn_as_they_are():
    from tinysft.rng import uniform_at_least
    ours, theirs = (np.random.Generator(np.random.MT19937(3)) for _ in range(2))
    np.testing.assert_array_equal(uniform_at_least(ours, 100_000, np.float64, 0.5), theirs.random(100_000) >= 0.5)
