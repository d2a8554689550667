"""Plain float64 NumPy helpers the checks build their references from.

Nothing here calls tinysft's ops: each reference must be an independent
evaluation of the formula, so that the implementation and the check cannot share
a mistake. ``autograd_vs_fd`` is the one bridge: it runs the implementation, but
only to compare its autograd gradient with central differences of its own values.
"""
import math

import numpy as np

from .registry import FD_STEP, FD_TOL


def log_softmax(x):
    """x − log Σ e^x per row, with the log-sum-exp from np.logaddexp.reduce (pairwise, overflow-free)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def softmax(x):
    return np.exp(log_softmax(x))


def one_hot(targets, classes):
    y = np.zeros((len(targets), classes))
    y[np.arange(len(targets)), targets] = 1.0
    return y


def normal_quantile(upper_tail):
    """z with P(Z > z) = upper_tail for a standard normal Z (bisection on math.erfc)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(mid / math.sqrt(2)) > upper_tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def central_differences(f, x, h=FD_STEP):
    """∂f/∂x_j ≈ (f(x + h e_j) − f(x − h e_j)) / 2h for every j; f maps a float64 array to a float."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for j in range(flat.size):
        keep = flat[j]
        flat[j] = keep + h
        plus = f(x)
        flat[j] = keep - h
        minus = f(x)
        flat[j] = keep
        out[j] = (plus - minus) / (2 * h)
    return grad


def autograd_vs_fd(m, fn, arrays, rng, names=None):
    """Compare tinysft's gradient of Σ w·fn(*inputs) with central differences, every input, in float64.

    ``fn`` takes Tensors and returns a Tensor; ``w`` are fixed random weights, so every
    output element counts (as in tinysft.gradcheck). Records one part per input and
    returns the analytic gradients.
    """
    from ..tensor import Tensor
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    weights = rng.standard_normal(out.shape)
    (out * Tensor(weights)).sum().backward()
    analytic = [leaf.grad if leaf.grad is not None else np.zeros(leaf.shape) for leaf in leaves]
    names = names or [f"input {k}" for k in range(len(arrays))]
    for k, name in enumerate(names):
        def f(value, k=k):
            args = [Tensor(value if i == k else a) for i, a in enumerate(arrays)]
            return float((np.asarray(fn(*args).numpy(), dtype=np.float64) * weights).sum())
        numeric = central_differences(f, arrays[k])
        m.close(f"∂/∂{name}: autograd vs central differences", analytic[k], numeric, FD_TOL)
    return analytic
