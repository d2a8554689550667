"""Optimizer update rules: SGD (plain, momentum, Nesterov), Adam and AdamW with bias correction.

Each check runs several steps with random gradients written into ``.grad`` and
compares the total change θ_T − θ_0 with the same steps written out in float64
(comparing the change, not θ itself, keeps a too-small update from hiding
behind the size of θ). In float32 the tolerance adds the rounding of θ itself,
steps·eps₃₂·max|θ|/max|Δθ|.
"""
import numpy as np

from .registry import Measure, check

STEPS = 5


def _sgd():
    from ..optim import SGD
    return SGD


def _adam():
    from ..optim import Adam
    return Adam


def _adamw():
    from ..optim import AdamW
    return AdamW


def _params(rng, dtype, shapes=((3, 4), (6,))):
    """Initial values (float64, as rounded to dtype) and gradient sequences with mixed scales."""
    init = [np.asarray(rng.standard_normal(s), dtype=dtype).astype(np.float64) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s) * np.exp(rng.uniform(-3, 1, s)), dtype=dtype).astype(np.float64)
              for _ in range(STEPS)] for s in shapes]
    return init, grads


def run_optimizer(make, init, grads, dtype):
    """θ_T of tinysft's optimizer ``make(params)`` after feeding the gradient sequences."""
    from ..tensor import Tensor
    params = [Tensor(np.array(x, dtype=dtype), requires_grad=True) for x in init]
    opt = make(params)
    for t in range(len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = np.array(g[t], dtype=dtype)
        opt.step()
    return [p.numpy().astype(np.float64) for p in params]


def sgd_reference(theta, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """θ ← θ − η d;  d = g (+λθ);  b ← μb + d (b₁ = d);  d = b, or d + μb with Nesterov."""
    theta, buf = theta.copy(), None
    for g in grads:
        g = g + weight_decay * theta
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
    return theta


def adam_reference(theta, grads, lr, betas, eps, weight_decay=0.0, decoupled=False):
    """Adam with bias correction; λ either added to g (L2, coupled) or applied as θ ← θ − ηλθ (decoupled)."""
    (b1, b2), theta = betas, theta.copy()
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            theta = theta - lr * weight_decay * theta
        else:
            g = g + weight_decay * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def rounding_allowance(dtype, theta, update, steps):
    """Storing θ in ``dtype`` rounds it by ≤ ½ulp(θ) per step: relative to max|Δθ| that is
    steps·eps·max|θ|/max|Δθ| (negligible in float64, ~1e-5 in float32)."""
    scale = np.abs(update).max()
    return steps * float(np.finfo(dtype).eps) * np.abs(theta).max() / scale if scale > 0 else 0.0


def compare_updates(m, label, got, init, want, steps=STEPS):
    """Record θ_T − θ_0 of the implementation against the reference's, all parameters together.

    Tolerance: the formula tolerance plus the rounding of θ itself (``rounding_allowance``).
    """
    update = np.concatenate([(b - x).ravel() for b, x in zip(want, init)])
    theta = np.concatenate([x.ravel() for x in want])
    m.close(label, np.concatenate([(a - x).ravel() for a, x in zip(got, init)]), update,
            m.tol + rounding_allowance(m.dtype, theta, update, steps))


def _sgd_check(rng, dtype, impl, **hyper):
    m = Measure(dtype)
    init, grads = _params(rng, dtype)
    lr = 0.1
    got = run_optimizer(lambda ps: impl(ps, lr=lr, **hyper), init, grads, dtype)
    want = [sgd_reference(x, g, lr, **hyper) for x, g in zip(init, grads)]
    compare_updates(m, f"θ_{STEPS} − θ_0 vs the update rule", got, init, want)
    return m


@check("sgd", "optimizers",
       formula="θ ← θ − η ∇L",
       method=f"{STEPS} steps, η = 0.1, random gradients: θ_T − θ_0 vs the rule in float64",
       explanation="""
       Plain gradient descent moves every parameter against its gradient, scaled by the learning rate η:
       θ_{t+1} = θ_t − η g_t. After T steps θ_T − θ_0 = −η Σ_t g_t, which the check compares.
       """,
       impl=_sgd)
def check_sgd(rng, dtype, impl):
    return _sgd_check(rng, dtype, impl)


@check("sgd_momentum", "optimizers",
       formula="b ← μ b + ∇L (b₁ = ∇L);  θ ← θ − η b",
       method=f"μ = 0.9, {STEPS} steps: θ_T − θ_0 vs the rule in float64",
       explanation="""
       Heavy-ball momentum keeps a running sum of gradients b_t = μ b_{t−1} + g_t (b_1 = g_1, PyTorch's
       convention, no dampening) and steps along it: θ_{t+1} = θ_t − η b_t. A constant gradient g gives
       steps that grow to η g/(1 − μ): momentum multiplies the effective rate by 1/(1 − μ) = 10 here.
       """,
       impl=_sgd)
def check_sgd_momentum(rng, dtype, impl):
    return _sgd_check(rng, dtype, impl, momentum=0.9)


@check("sgd_nesterov", "optimizers",
       formula="b ← μ b + ∇L;  θ ← θ − η (∇L + μ b)",
       method=f"μ = 0.9, {STEPS} steps: θ_T − θ_0 vs the rule in float64",
       explanation="""
       Nesterov momentum evaluates the step "one momentum step ahead". In PyTorch's reformulation
       (Sutskever et al. 2013) that becomes: update b_t = μ b_{t−1} + g_t, then step along g_t + μ b_t
       instead of b_t. The two rules agree at step 1 only when μ = 0, so a few steps tell them apart.
       """,
       impl=_sgd)
def check_sgd_nesterov(rng, dtype, impl):
    return _sgd_check(rng, dtype, impl, momentum=0.9, nesterov=True)


ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


@check("adam", "optimizers",
       formula="m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − η · m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)",
       method=f"β = (0.9, 0.999), η = 1e-2, {STEPS} steps, gradients spanning e^−3…e^1: θ_T − θ_0 vs the rule",
       explanation="""
       m and v start at 0, so early on they are biased towards 0: E[m_t] = (1 − β₁ᵗ) E[g] for a
       stationary gradient. Dividing by (1 − β₁ᵗ) and (1 − β₂ᵗ) removes that bias. Without the
       correction the first step is η·(1−β₁)g/(√(1−β₂)|g|) ≈ 3.2η·sign(g) instead of η·sign(g), so the
       first few steps of an uncorrected Adam are off by a factor that only fades after ~1/(1−β₂) steps.
       """,
       impl=_adam)
def check_adam(rng, dtype, impl):
    m = Measure(dtype)
    init, grads = _params(rng, dtype)
    got = run_optimizer(lambda ps: impl(ps, **ADAM), init, grads, dtype)
    want = [adam_reference(x, g, **ADAM) for x, g in zip(init, grads)]
    compare_updates(m, f"θ_{STEPS} − θ_0 vs Adam with bias correction", got, init, want)
    return m


@check("adamw", "optimizers",
       formula="θ ← θ − ηλθ;  then the Adam step θ ← θ − η · m̂/(√v̂ + ε) on g alone",
       method=f"λ = 0.1, {STEPS} steps: θ_T − θ_0 vs the rule (Loshchilov & Hutter 2019)",
       explanation="""
       AdamW shrinks the weights directly, θ ← (1 − ηλ)θ, and feeds Adam only the loss gradient g.
       The shrink is the same fraction ηλ for every weight, whatever its gradient history; see
       decay_adam_differ and decay_sgd_coincide for how that differs from adding λθ to g.
       """,
       impl=_adamw)
def check_adamw(rng, dtype, impl):
    m = Measure(dtype)
    init, grads = _params(rng, dtype)
    got = run_optimizer(lambda ps: impl(ps, weight_decay=0.1, **ADAM), init, grads, dtype)
    want = [adam_reference(x, g, weight_decay=0.1, decoupled=True, **ADAM) for x, g in zip(init, grads)]
    compare_updates(m, f"θ_{STEPS} − θ_0 vs decoupled decay + Adam", got, init, want)
    return m
