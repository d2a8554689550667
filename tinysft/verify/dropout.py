"""Inverted dropout: the mean is preserved and the variance is x²·p/(1−p), tested statistically.

Every z-test here is two-sided at a false-alarm rate α = 1e-6 (|z| > 4.89), so
with fixed seeds a correct implementation fails with probability about 1e-6 per
test, and a biased one fails as soon as its bias is a few standard errors.
"""
import math

import numpy as np

from .reference import normal_quantile
from .registry import Measure, check

ALPHA = 1e-6
Z_CRIT = normal_quantile(ALPHA / 2)
P = 0.3
WIDTH, DRAWS = 1000, 200  # 200 000 dropout samples per test


def _dropout():
    from ..functional import dropout
    return dropout


def _draws(rng, dtype, impl, x):
    """DRAWS independent dropout outputs of x, stacked (DRAWS, WIDTH), in float64."""
    from ..tensor import Tensor
    gen = np.random.default_rng(rng.integers(2**63))
    big = Tensor(np.broadcast_to(np.asarray(x, dtype=dtype), (DRAWS, x.size)).copy())
    return np.asarray(impl(big, P, True, gen).numpy(), dtype=np.float64)


def _inputs(rng, dtype):
    return np.asarray(rng.uniform(0.5, 2.0, WIDTH) * rng.choice([-1.0, 1.0], WIDTH), dtype=dtype).astype(np.float64)


@check("dropout_mean", "dropout",
       formula="y = x·m/(1−p), m ~ Bernoulli(1−p)  ⇒  E[y] = x;  eval mode: y = x",
       method=f"p = {P}, n = {DRAWS}×{WIDTH} samples: z = Σ(y/x − 1)/√(n·p/(1−p)), two-sided α = 1e-6 "
              f"(|z| ≤ {Z_CRIT:.2f}); eval mode exact",
       explanation=f"""
       Each unit survives with probability 1−p and is scaled by 1/(1−p), so
       E[y] = (1−p)·x/(1−p) + p·0 = x: the expected activation is unchanged and evaluation (no
       dropout) needs no rescaling. The ratio r = y/x = m/(1−p) has mean 1 and variance p/(1−p)
       whatever x is, so S = Σ(r − 1) over n independent samples has standard deviation
       √(n·p/(1−p)) and z = S/sd is ≈ N(0, 1) (CLT). Without the 1/(1−p) rescaling E[r] = 1 − p and
       z = −p·√(n(1−p)/p) — about −120 here, far past {Z_CRIT:.2f}.
       α = 1e-6: a correct implementation is flagged once in a million seeds.
       """,
       impl=_dropout)
def check_dropout_mean(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    x = _inputs(rng, dtype)
    y = _draws(rng, dtype, impl, x)
    ratio = y / x  # E = 1, Var = p/(1−p), whatever the sign and size of x
    z = (ratio - 1).sum() / math.sqrt(ratio.size * P / (1 - P))
    m.value("z of Σ(y/x − 1) (E[y] = x)", abs(z), Z_CRIT)
    m.note(f"mean of y/x = {ratio.mean():.4f} (expected 1)")
    gen = np.random.default_rng(0)
    m.close("eval mode (training=False) is the identity", impl(Tensor(np.asarray(x, dtype=dtype)), P, False, gen), x)
    return m


@check("dropout_variance", "dropout",
       formula="Var[y] = x²·p/(1−p);  kept entries = x/(1−p);  P(drop) = p;  ∂y/∂x = m/(1−p)",
       method=f"p = {P}: z-test of Σ(y − x)² against its exact mean and variance, z-test of the drop count "
              "(α = 1e-6 each); kept values and gradient exact",
       explanation="""
       y − x = x(m/(1−p) − 1) takes two values: x·p/(1−p) with probability 1−p (kept) and −x with
       probability p (dropped). So E[(y − x)²] = x²[(1−p)·p²/(1−p)² + p] = x²·p/(1−p), the variance.
       (y − x)² itself is two-valued, x⁴·(a − 1)² · p(1−p) is its variance with a = (p/(1−p))², which
       gives the standard error of Σ(y − x)² and hence a z statistic. The number of dropped entries
       is Binomial(n, p): z = (k − np)/√(np(1−p)). The backward pass must use the same mask and
       scale: ∂y/∂x = m/(1−p), i.e. grad = y/x elementwise.
       """,
       impl=_dropout)
def check_dropout_variance(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    x = _inputs(rng, dtype)
    y = _draws(rng, dtype, impl, x)
    d2 = ((y - x) ** 2).sum()
    a = (P / (1 - P)) ** 2
    mean = DRAWS * (x * x).sum() * P / (1 - P)
    sd = math.sqrt(DRAWS * (x ** 4).sum() * (a - 1) ** 2 * P * (1 - P))
    m.value("z of Σ(y − x)² (Var[y] = x²p/(1−p))", abs(d2 - mean) / sd, Z_CRIT)
    dropped = int((y == 0).sum())
    n = y.size
    m.value("z of the number dropped (P(drop) = p)", abs(dropped - n * P) / math.sqrt(n * P * (1 - P)), Z_CRIT)
    kept = y != 0
    m.close("kept entries vs x/(1−p)", y[kept], np.broadcast_to(x / (1 - P), y.shape)[kept])
    m.note(f"sample Var[y]/(x²p/(1−p)) = {d2 / mean:.4f} (expected 1)")
    # gradient: same mask, same scale
    gen = np.random.default_rng(rng.integers(2**63))
    leaf = Tensor(np.asarray(x, dtype=dtype), requires_grad=True)
    out = impl(leaf, P, True, gen)
    out.sum().backward()
    m.close("∂Σy/∂x vs m/(1−p) = y/x", leaf.grad, out.numpy().astype(np.float64) / x)
    return m


SCHEDULE = "linear:0.1:0.5"  # three layers: 0.1, 0.3, 0.5 from the bottom


def _set_dropout():
    return lambda encoder, rates: encoder.set_dropout(rates)


@check("dropout_schedule", "dropout",
       formula="--dropout-schedule linear:LOW:HIGH: layer i of L drops with p_i = LOW + (HIGH − LOW)·i/(L − 1) "
               "in its attention probabilities and both sub-layer outputs",
       method=f"{SCHEDULE} on a 3-layer encoder in training mode: each of the 9 dropout calls of one forward, "
              "z = (k − n·p_i)/√(n·p_i(1 − p_i)) for k of its n inputs dropped, two-sided α = 1e-6 each",
       explanation=f"""
       Every dropout call of one forward pass is recorded with its input and output, in the order
       the layers run them: per layer the attention probabilities, the attention output, the FFN
       output. A call at rate p zeroes each of its n (non-zero) inputs independently with
       probability p, so the number k it zeroes is Binomial(n, p) and z = (k − np)/√(np(1 − p)) is
       ≈ N(0, 1). Each call is tested against the rate of the layer it belongs to, so a schedule
       applied top to bottom, or to the hidden dropouts but not the attention probabilities, puts
       z in the tens (the rates of neighbouring layers differ by 0.2). |z| ≤ {Z_CRIT:.2f}: a correct
       implementation is flagged once in a million seeds per call.
       """,
       impl=_set_dropout)
def check_dropout_schedule(rng, dtype, impl):
    from .. import functional
    from ..nn.transformer import TransformerEncoder, dropout_schedule
    from ..tensor import Tensor
    m = Measure(dtype)
    encoder = TransformerEncoder(3, 16, 2, 32, dropout=0.0, attention_dropout=0.0,
                                 generator=np.random.default_rng(rng.integers(2**63))).astype(dtype).train()
    rates = dropout_schedule(SCHEDULE, 3)
    impl(encoder, rates)
    calls, real = [], functional.dropout

    def recording(x, p=0.5, training=True, generator=None):
        y = real(x, p, training, generator)
        live = x.numpy() != 0
        calls.append((int(live.sum()), int((y.numpy()[live] == 0).sum())))
        return y

    functional.dropout = recording  # the layers call it through the module: F.dropout
    try:
        encoder(Tensor(rng.standard_normal((32, 16, 16)).astype(dtype)))
    finally:
        functional.dropout = real
    where = ("attention probabilities", "attention output", "FFN output")
    if len(calls) != 3 * len(rates):
        m.value(f"number of dropout calls ({len(calls)}, expected {3 * len(rates)})", math.inf, 0)
        return m
    for i, (n, k) in enumerate(calls):
        p = rates[i // 3]
        m.value(f"layer {i // 3} {where[i % 3]}: z of the drop count (p = {p:g})",
                abs(k - n * p) / math.sqrt(n * p * (1 - p)), Z_CRIT)
    return m
