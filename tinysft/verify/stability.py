"""Numerics of the building blocks: softmax at extreme logits, layer norm and GELU."""
import math

import numpy as np

from . import reference as ref
from .registry import Measure, check


def _functional():
    from .. import functional
    return functional


EXTREME = np.array([
    [1e4, -1e4, 0.0, 1.0],             # one huge, one tiny: e^(1e4) overflows any float
    [1e4, 1e4 - 1.0, 1e4 - 2.0, -1e4],  # all near 1e4: only differences matter
    [-1e4, -1e4 + 0.5, -1e4, -1e4],     # all near −1e4: e^x underflows to 0 without the shift
    [0.0, -np.inf, 2.0, -np.inf],       # −inf: masked positions, probability exactly 0
    [-np.inf, -np.inf, -np.inf, 3.0],   # a single finite entry
])


@check("softmax_stability", "stability",
       formula="log softmax(x)_c = x_c − m − log Σ_k e^(x_k − m), m = max_k x_k;  logits ±1e4 and −inf",
       method="5 extreme rows: log-softmax, softmax, Σp = 1, CE loss and gradients vs np.logaddexp.reduce "
              "(float64); everything finite except the −inf log-probs",
       explanation="""
       e^x overflows float64 for x > 709 (float32: 88) and underflows to 0 for x < −745, so a literal
       log Σ e^x returns inf or −inf at logits ±1e4. Subtracting m = max x first changes nothing
       mathematically (e^(−m) cancels between numerator and denominator) but makes the largest term
       e^0 = 1: the sum lies in [1, C] and its log is exact. A −inf logit (a masked class) gives
       e^(−inf − m) = 0: probability 0, log-probability −inf, and its cross-entropy gradient
       p − y is exactly 0. Backward of log-softmax: ∂/∂x of Σ_c g_c·logp_c is g − p·Σ_c g_c, finite
       everywhere (no e^x of a large x is ever formed).
       """,
       impl=_functional)
def check_softmax_stability(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    x64 = EXTREME.astype(dtype).astype(np.float64)
    want_logp, want_p = ref.log_softmax(x64), ref.softmax(x64)
    leaf = Tensor(np.array(x64, dtype=dtype), requires_grad=True)
    logp = impl.log_softmax(leaf, axis=-1)
    upstream = rng.standard_normal(x64.shape)
    logp.backward(np.asarray(upstream, dtype=dtype))
    # log-probs reach −2e4; compare each against 1 + |log p| (a float's own rounding of that entry)
    got = logp.numpy().astype(np.float64)
    finite = np.isfinite(want_logp)
    m.require("−inf exactly where a logit is −inf, finite elsewhere",
              np.array_equal(np.isfinite(got), finite) and np.all(got[~finite] == -np.inf),
              "log-softmax has inf/nan in the wrong places")
    if np.array_equal(np.isfinite(got), finite):
        err = np.abs(got[finite] - want_logp[finite]) / (1 + np.abs(want_logp[finite]))
        m.value("log-softmax vs x − logaddexp.reduce(x), per entry / (1 + |log p|)", err.max(), m.tol)
    m.close("∂/∂x of Σ g·logp vs g − p·Σg", leaf.grad, upstream - want_p * upstream.sum(1, keepdims=True))
    p = impl.softmax(Tensor(np.array(x64, dtype=dtype)), axis=-1)
    m.close("softmax vs exp(reference log-softmax)", p, want_p)
    m.close("Σ_c p_c vs 1", p.numpy().astype(np.float64).sum(axis=1), np.ones(len(x64)))
    targets = np.array([0, 2, 1, 2, 3])
    ce_leaf = Tensor(np.array(x64, dtype=dtype), requires_grad=True)
    loss = impl.cross_entropy(ce_leaf, targets)
    loss.backward()
    rows = -want_logp[np.arange(len(targets)), targets]
    m.close("cross-entropy at extreme logits vs −mean log p_t", loss, rows.mean())
    m.close("its gradient vs (p − y)/N", ce_leaf.grad, (want_p - ref.one_hot(targets, 4)) / len(targets))
    return m


@check("layer_norm", "stability",
       formula="y = (x − μ)/√(σ² + ε)·w + b, μ, σ² (biased) over the last axis;  gradients for x, w, b",
       method="values vs the formula (8×16); gradients vs the explicit Jacobian r(I − 1/D − x̂x̂ᵀ/D) and vs "
              "central differences (3×6, float64)",
       explanation="""
       x̂ = (x − μ)·r with r = 1/√(σ² + ε). Differentiating μ = mean(x) and σ² = mean((x − μ)²):
       ∂x̂_i/∂x_j = r(δ_ij − 1/D − x̂_i x̂_j/D)  (the 1/D removes the mean, the x̂x̂ᵀ/D term the scale).
       With upstream g and dx̂ = g·w: dx = r/D·(D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)) — the fused backward.
       ∂y/∂w = x̂ and ∂y/∂b = 1, summed over the rows.
       """,
       impl=_functional)
def check_layer_norm(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    eps = 1e-5
    x = np.asarray(rng.standard_normal((8, 16)) * 2 + 0.5, dtype=dtype).astype(np.float64)
    w = np.asarray(1 + 0.2 * rng.standard_normal(16), dtype=dtype).astype(np.float64)
    b = np.asarray(0.2 * rng.standard_normal(16), dtype=dtype).astype(np.float64)
    leaves = [Tensor(np.array(a, dtype=dtype), requires_grad=True) for a in (x, w, b)]
    out = impl.layer_norm(*leaves, eps=eps)
    g = rng.standard_normal(out.shape)
    out.backward(np.asarray(g, dtype=dtype))
    mu = x.mean(-1, keepdims=True)
    r = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * r
    m.close("y vs (x − μ)/√(σ² + ε)·w + b", out, xhat * w + b)
    d = x.shape[1]
    dx = np.stack([r[i, 0] * (np.eye(d) - 1 / d - np.outer(xhat[i], xhat[i]) / d) @ (g[i] * w) for i in range(len(x))])
    m.close("∂/∂x vs Jacobian r(I − 1/D − x̂x̂ᵀ/D) applied to g·w", leaves[0].grad, dx)
    m.close("∂/∂w vs Σ_rows g·x̂", leaves[1].grad, (g * xhat).sum(0))
    m.close("∂/∂b vs Σ_rows g", leaves[2].grad, g.sum(0))
    ref.autograd_vs_fd(m, lambda *t: impl.layer_norm(*t, eps=eps),
                       [x[:3, :6], w[:6], b[:6]], rng, names=["x", "w", "b"])
    return m


@check("gelu", "stability",
       formula="GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2));  GELU'(x) = Φ(x) + x·φ(x);  "
               "tanh form ½x(1 + tanh(√(2/π)(x + 0.044715x³)))",
       method="61 points in [−6, 6] plus ±30: values vs math.erf, gradient vs Φ + xφ and central differences; "
              "tanh approximation vs its formula",
       explanation="""
       GELU weights x by the probability Φ(x) that a standard normal is below it; Φ(x) = ½(1 + erf(x/√2)).
       Product rule: d/dx[x·Φ(x)] = Φ(x) + x·Φ'(x) = Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π).
       tinysft evaluates erf with its own rational approximation (Cephes); the check uses Python's
       math.erf, an independent implementation, and central differences of tinysft's own values.
       Far out (x = ±30) GELU(x) is x or −0 and the gradient 1 or 0, with no overflow.
       """,
       impl=_functional)
def check_gelu(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    x = np.concatenate([np.linspace(-6, 6, 61), [-30.0, 30.0], rng.uniform(-3, 3, 8)])
    x = np.asarray(x, dtype=dtype).astype(np.float64)
    phi_cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    leaf = Tensor(np.array(x, dtype=dtype), requires_grad=True)
    y = impl.gelu(leaf)
    y.sum().backward()
    m.close("GELU(x) vs ½x(1 + math.erf(x/√2))", y, x * phi_cdf)
    m.close("GELU'(x) vs Φ(x) + xφ(x)", leaf.grad, phi_cdf + x * pdf)
    c = math.sqrt(2 / math.pi)
    m.close("tanh GELU vs ½x(1 + tanh(√(2/π)(x + 0.044715x³)))",
            impl.gelu(Tensor(np.array(x, dtype=dtype)), approximate="tanh"),
            0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3))))
    ref.autograd_vs_fd(m, lambda t: impl.gelu(t), [x[::4]], rng, names=["x (exact)"])
    ref.autograd_vs_fd(m, lambda t: impl.gelu(t, approximate="tanh"), [x[::4]], rng, names=["x (tanh)"])
    return m
