"""Losses: softmax cross-entropy (plain, label smoothing, ignore_index) and mean squared error."""
import numpy as np

from . import reference as ref
from .registry import Measure, check


def _functional():
    from .. import functional
    return functional


def _cross_entropy():
    return _functional().cross_entropy


def _mse():
    return _functional().mse_loss


def _leaf(array, dtype):
    from ..tensor import Tensor
    return Tensor(np.array(array, dtype=dtype), requires_grad=True)


def _as_run(array, dtype):
    """The inputs exactly as the implementation sees them, in float64 for the reference."""
    return np.asarray(array, dtype=dtype).astype(np.float64)


@check("cross_entropy", "losses",
       formula="L = −(1/N) Σ_i Σ_c y_ic log p_ic, p = softmax(x), y one-hot;  ∂L/∂x = (p − y)/N",
       method="loss and gradient vs the formula in float64 NumPy (N=16, C=7); gradient also vs central differences",
       explanation="""
       p_ic = e^(x_ic) / Σ_k e^(x_ik), so log p_ic = x_ic − log Σ_k e^(x_ik).
       With one-hot y (Σ_c y_ic = 1) the loss of row i is −log p_i,t = lse_i − x_i,t.
       ∂(lse_i)/∂x_ic = p_ic and ∂x_i,t/∂x_ic = y_ic, so ∂loss_i/∂x_ic = p_ic − y_ic.
       The mean over N rows divides every row's gradient by N: ∂L/∂x = (p − y)/N.
       A gradient missing the 1/N is N times too large; central differences of L see that.
       """,
       impl=_cross_entropy)
def check_cross_entropy(rng, dtype, impl):
    m = Measure(dtype)
    n, c = 16, 7
    logits = _as_run(3 * rng.standard_normal((n, c)), dtype)
    targets = rng.integers(0, c, n)
    x = _leaf(logits, dtype)
    loss = impl(x, targets)
    loss.backward()
    p, y = ref.softmax(logits), ref.one_hot(targets, c)
    m.close("L vs −(1/N)ΣΣ y log p", loss, -(y * ref.log_softmax(logits)).sum() / n)
    m.close("∂L/∂x vs (p − y)/N", x.grad, (p - y) / n)
    small = 3 * rng.standard_normal((5, 4))
    small_targets = rng.integers(0, 4, 5)
    ref.autograd_vs_fd(m, lambda t: impl(t, small_targets), [small], rng, names=["x"])
    return m


@check("cross_entropy_smoothing_ignore", "losses",
       formula="y = (1−ε)·onehot + ε/C;  L = −(1/|V|) Σ_{i∈V} Σ_c y_ic log p_ic, V = rows with t_i ≠ ignore_index;"
               "  ∂L/∂x_i = (p_i − y_i)/|V| on V, 0 elsewhere",
       method="ε = 0.1, 5 of 16 rows ignored: loss and gradient vs the formula; gradient vs central differences",
       explanation="""
       Label smoothing replaces the one-hot target by y = (1−ε)·onehot + ε/C, still a distribution (Σ_c y_c = 1).
       Row loss: −Σ_c y_c log p_c = Σ_c y_c (lse − x_c) = lse − Σ_c y_c x_c
               = (1−ε)(lse − x_t) + ε(lse − mean_c x_c).
       Its gradient is p − y, as for any target distribution (∂lse/∂x = p, ∂(Σ y_c x_c)/∂x = y).
       ignore_index rows are dropped from the sum AND from the count: the mean is over |V| rows,
       so each kept row's gradient is (p − y)/|V| and ignored rows get exactly 0.
       """,
       impl=_cross_entropy)
def check_cross_entropy_smoothing_ignore(rng, dtype, impl):
    m = Measure(dtype)
    n, c, eps, ignore = 16, 7, 0.1, -100
    logits = _as_run(3 * rng.standard_normal((n, c)), dtype)
    targets = rng.integers(0, c, n)
    dropped = rng.choice(n, 5, replace=False)
    targets[dropped] = ignore
    kept = targets != ignore
    x = _leaf(logits, dtype)
    loss = impl(x, targets, ignore_index=ignore, label_smoothing=eps)
    loss.backward()
    y = (1 - eps) * ref.one_hot(np.where(kept, targets, 0), c) + eps / c
    rows = -(y * ref.log_softmax(logits)).sum(axis=1)
    grad = (ref.softmax(logits) - y) / kept.sum()
    grad[~kept] = 0.0
    m.close("L vs mean over kept rows of −Σ y log p", loss, rows[kept].mean())
    m.close("∂L/∂x vs (p − y)/|V|, 0 on ignored rows", x.grad, grad)
    small = 3 * rng.standard_normal((6, 4))
    small_targets = np.array([0, ignore, 3, 1, ignore, 2])
    ref.autograd_vs_fd(m, lambda t: impl(t, small_targets, ignore_index=ignore, label_smoothing=eps),
                       [small], rng, names=["x"])
    return m


@check("mse", "losses",
       formula="L = (1/n) Σ_j (x_j − y_j)²;  ∂L/∂x = 2(x − y)/n",
       method="loss and gradient vs the formula (n = 4·9); gradient also vs central differences",
       explanation="""
       Each squared residual r_j² has derivative 2 r_j; the mean divides by the number of
       elements n (all of them, not the batch size), so ∂L/∂x_j = 2(x_j − y_j)/n.
       """,
       impl=_mse)
def check_mse(rng, dtype, impl):
    m = Measure(dtype)
    x0 = _as_run(rng.standard_normal((4, 9)), dtype)
    y0 = _as_run(rng.standard_normal((4, 9)), dtype)
    x = _leaf(x0, dtype)
    loss = impl(x, np.asarray(y0, dtype=dtype))
    loss.backward()
    m.close("L vs (1/n)Σ(x − y)²", loss, ((x0 - y0) ** 2).mean())
    m.close("∂L/∂x vs 2(x − y)/n", x.grad, 2 * (x0 - y0) / x0.size)
    ref.autograd_vs_fd(m, lambda t: impl(t, y0[:2, :5]), [x0[:2, :5]], rng, names=["x"])
    return m
