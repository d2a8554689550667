"""Check analytic gradients against central finite differences in float64.

>>> import numpy as np
>>> gradcheck(lambda x: (x * x).sum(), [np.array([1.0, -2.0])])
True
"""
import numpy as np

from .tensor import Tensor


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with its finite-difference estimate."""


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0) -> bool:
    """Compare autograd's gradient of ``fn(*inputs)`` with central differences.

    Every input is copied to float64. A non-scalar output is reduced to the
    scalar Σ out·w with fixed random weights w, so every output element counts.
    For each element j of each input: (f(x + ε e_j) − f(x − ε e_j)) / 2ε must
    match the analytic ∂f/∂x_j within ``atol + rtol·|numeric|``.
    Returns True, or raises GradcheckError naming the input, the element, both
    values and the error.
    """
    leaves = [Tensor(np.array(t.numpy() if isinstance(t, Tensor) else t, dtype=np.float64), requires_grad=True)
              for t in inputs]
    probe = fn(*leaves)
    weights = np.random.default_rng(seed).standard_normal(probe.shape)

    def scalar(*args):
        return float((fn(*args).numpy().astype(np.float64) * weights).sum())

    (fn(*leaves) * Tensor(weights)).sum().backward()
    for position, leaf in enumerate(leaves):
        analytic = leaf.grad if leaf.grad is not None else np.zeros(leaf.shape)
        numeric = np.zeros(leaf.shape)
        flat = leaf.data.reshape(-1)  # a view: nudging it nudges the input
        for j in range(flat.size):
            original = flat[j]
            flat[j] = original + eps
            plus = scalar(*leaves)
            flat[j] = original - eps
            minus = scalar(*leaves)
            flat[j] = original
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        error = np.abs(analytic - numeric)
        excess = error - (atol + rtol * np.abs(numeric))
        if excess.size and excess.max() > 0:
            worst = np.unravel_index(int(np.argmax(excess)), leaf.shape)
            raise GradcheckError(
                f"gradcheck: input {position} (shape {leaf.shape}), element {tuple(int(i) for i in worst)}: "
                f"analytic {analytic[worst]:.10g} vs numeric {numeric[worst]:.10g}, "
                f"error {error[worst]:.3g} > atol {atol} + rtol {rtol}·|numeric|")
    return True
