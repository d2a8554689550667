"""Weight penalties (L1, L2, L2-SP) and decoupled weight decay vs L2 in the loss."""
import numpy as np

from .optimizers import ADAM, STEPS, _params, adam_reference, compare_updates, rounding_allowance, run_optimizer
from .registry import Measure, check

LAMBDA = 0.03


def _penalty_loss():
    from ..optim import penalty_loss
    return penalty_loss


def _penalty_check(rng, dtype, impl, kind, value_fn, grad_fn, anchored=False):
    """Build one group with the penalty, compare its value and gradient with the formulas."""
    from ..tensor import Tensor
    m = Measure(dtype)
    shapes = ((4, 5), (7,))
    theta = [np.asarray(rng.standard_normal(s), dtype=dtype).astype(np.float64) for s in shapes]
    theta[0][0, :3] = 0.0  # exact zeros: L1's subgradient there must be 0
    anchor = [np.asarray(t + 0.3 * rng.standard_normal(t.shape), dtype=dtype).astype(np.float64) for t in theta]
    params = [Tensor(np.array(t, dtype=dtype), requires_grad=True) for t in theta]
    group = {"params": params, "penalty": kind, "penalty_lambda": LAMBDA}
    if anchored:
        group["penalty_anchor"] = [np.array(a, dtype=dtype) for a in anchor]
    total = impl([group])
    total.backward()
    m.close("penalty value vs formula", total, value_fn(theta, anchor))
    m.close("∂penalty/∂θ vs formula", np.concatenate([p.grad.ravel() for p in params]),
            np.concatenate([grad_fn(t, a).ravel() for t, a in zip(theta, anchor)]))
    # central differences of the implementation's own value (one small parameter, float64)
    from .reference import central_differences
    from .registry import FD_TOL
    small, small_anchor = theta[1].copy(), anchor[1].copy()

    def value_at(x):
        g = {"params": [Tensor(x.copy(), requires_grad=True)], "penalty": kind, "penalty_lambda": LAMBDA}
        if anchored:
            g["penalty_anchor"] = [small_anchor]
        return float(impl([g]).numpy())
    g64 = {"params": [Tensor(small.copy(), requires_grad=True)], "penalty": kind, "penalty_lambda": LAMBDA}
    if anchored:
        g64["penalty_anchor"] = [small_anchor]
    impl([g64]).backward()
    m.close("∂penalty/∂θ: autograd vs central differences", g64["params"][0].grad,
            central_differences(value_at, small), FD_TOL)
    return m


@check("l1_penalty", "regularization",
       formula="R = λ Σ|θ|;  ∂R/∂θ = λ·sign(θ), with 0 at θ = 0",
       method="λ = 0.03, two tensors incl. exact zeros: value and subgradient vs formula; vs central differences",
       explanation="""
       |θ| is not differentiable at 0; its subdifferential there is [−1, 1]. Choosing 0 (the
       minimum-norm subgradient, PyTorch's sign(0) = 0) keeps weights that are exactly zero at zero.
       Elsewhere d|θ|/dθ = sign(θ), so every weight is pulled towards 0 by the same amount λ,
       whatever its size: L1 produces sparse weights. Central differences at θ = 0 give
       (|h| − |−h|)/2h = 0, the same choice.
       """,
       impl=_penalty_loss)
def check_l1(rng, dtype, impl):
    return _penalty_check(rng, dtype, impl, "l1",
                          lambda th, _: LAMBDA * sum(np.abs(t).sum() for t in th),
                          lambda t, _: LAMBDA * np.sign(t))


@check("l2_penalty", "regularization",
       formula="R = λ Σθ²;  ∂R/∂θ = 2λθ",
       method="λ = 0.03: value and gradient vs formula; gradient vs central differences",
       explanation="""
       d(θ²)/dθ = 2θ, so the penalty λΣθ² pulls each weight back with force 2λθ, proportional to
       its size. (Frameworks that write the penalty as (λ/2)Σθ² get λθ: the factor 2 belongs to
       whichever λ convention the penalty states; tinysft states λΣθ².)
       """,
       impl=_penalty_loss)
def check_l2(rng, dtype, impl):
    return _penalty_check(rng, dtype, impl, "l2",
                          lambda th, _: LAMBDA * sum((t * t).sum() for t in th),
                          lambda t, _: 2 * LAMBDA * t)


@check("l2sp_penalty", "regularization",
       formula="R = λ Σ(θ − θ₀)²;  ∂R/∂θ = 2λ(θ − θ₀), θ₀ the pretrained weights (Li et al. 2018)",
       method="λ = 0.03, θ₀ = θ + 0.3·noise: value and gradient vs formula; vs central differences; "
              "θ₀ snapshot taken when the group joins an optimizer",
       explanation="""
       L2-SP ("starting point") regularises towards the pretrained weights instead of towards 0:
       fine-tuning may move θ, but pays λ‖θ − θ₀‖². The gradient 2λ(θ − θ₀) vanishes at θ = θ₀,
       so unlike plain L2 it does not shrink the pretrained features. θ₀ is a constant: no
       gradient flows into it.
       """,
       impl=_penalty_loss)
def check_l2sp(rng, dtype, impl):
    m = _penalty_check(rng, dtype, impl, "l2sp",
                       lambda th, an: LAMBDA * sum(((t - a) ** 2).sum() for t, a in zip(th, an)),
                       lambda t, a: 2 * LAMBDA * (t - a), anchored=True)
    # the anchor is snapshotted by the optimizer: right after construction the penalty is 0
    from ..optim import SGD
    from ..tensor import Tensor
    p = Tensor(np.asarray(rng.standard_normal(5), dtype=dtype), requires_grad=True)
    opt = SGD([{"params": [p], "penalty": "l2sp", "penalty_lambda": LAMBDA}], lr=0.1)
    m.close("penalty right after snapshot θ₀ = θ (must be 0)", impl(opt.param_groups), 0.0)
    p.data += 1.0
    m.close("penalty after θ ← θ + 1 (must be λ·n)", impl(opt.param_groups), LAMBDA * p.size)
    return m


def _sgd_and_penalty():
    from ..optim import SGD, penalty_loss
    return {"SGD": SGD, "penalty_loss": penalty_loss}


@check("decay_sgd_coincide", "regularization",
       formula="plain SGD: θ − η(g + λθ)  =  (1 − ηλ)θ − ηg  (L2 in the gradient ≡ decoupled decay)",
       method="λ = 0.1, η = 0.1, 5 steps: SGD(weight_decay=λ), SGD + penalty (λ/2)Σθ² in the loss, and the "
              "decoupled rule written out; all three agree",
       explanation="""
       For SGD, adding λθ to the gradient gives θ − η(g + λθ) = (1 − ηλ)θ − ηg, which is exactly
       decoupled decay: shrink by ηλ, then step on g. The same holds for an L2 penalty (λ/2)Σθ² in the
       loss, whose gradient is λθ (with tinysft's λ'Σθ² convention, λ' = λ/2). So for plain SGD the
       three formulations coincide step by step; only adaptive methods tell them apart.
       """,
       impl=_sgd_and_penalty)
def check_decay_sgd_coincide(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    init, grads = _params(rng, dtype)
    lr, lam = 0.1, 0.1
    want = []
    for x, gs in zip(init, grads):
        theta = x.copy()
        for g in gs:
            theta = (1 - lr * lam) * theta - lr * g  # decoupled, written out
        want.append(theta)
    coupled = run_optimizer(lambda ps: impl["SGD"](ps, lr=lr, weight_decay=lam), init, grads, dtype)
    compare_updates(m, "SGD(weight_decay=λ) vs (1 − ηλ)θ − ηg", coupled, init, want)

    params = [Tensor(np.array(x, dtype=dtype), requires_grad=True) for x in init]
    opt = impl["SGD"]([{"params": params, "penalty": "l2", "penalty_lambda": lam / 2}], lr=lr)
    for t in range(len(grads[0])):
        for p in params:
            p.grad = None
        impl["penalty_loss"](opt).backward()
        for p, g in zip(params, grads):
            p.grad += np.asarray(g[t], dtype=dtype)
        opt.step()
    compare_updates(m, "SGD + (λ/2)Σθ² in the loss vs (1 − ηλ)θ − ηg",
                    [p.numpy().astype(np.float64) for p in params], init, want)
    return m


def _adam_pair():
    from ..optim import Adam, AdamW
    return {"Adam": Adam, "AdamW": AdamW}


@check("decay_adam_differ", "regularization",
       formula="Adam: θ − η·m̂(g + λθ)/(√v̂(g + λθ) + ε)   ≠   AdamW: (1 − ηλ)θ − η·m̂(g)/(√v̂(g) + ε)",
       method="λ = 0.1, 5 steps: Adam(weight_decay=λ) and AdamW(λ) each vs its rule; their gap vs the "
              "reference gap, which must be ≥ 5% of the update",
       explanation="""
       With Adam, L2's λθ enters m and v and is divided by √v̂ like the gradient: a weight with large
       past gradients (large v̂) is barely decayed, one with small gradients is decayed a lot. AdamW
       (decoupled) shrinks every weight by the same fraction ηλ, outside the adaptive scaling.
       So for Adam "weight decay" and "L2 in the loss" are different regularisers (Loshchilov &
       Hutter 2019), while for SGD they coincide (decay_sgd_coincide). The check shows the two
       trajectories separate by as much as the formulas predict.
       """,
       impl=_adam_pair)
def check_decay_adam_differ(rng, dtype, impl):
    m = Measure(dtype)
    init, grads = _params(rng, dtype)
    lam = 0.1
    got_l2 = run_optimizer(lambda ps: impl["Adam"](ps, weight_decay=lam, **ADAM), init, grads, dtype)
    got_dec = run_optimizer(lambda ps: impl["AdamW"](ps, weight_decay=lam, **ADAM), init, grads, dtype)
    want_l2 = [adam_reference(x, g, weight_decay=lam, **ADAM) for x, g in zip(init, grads)]
    want_dec = [adam_reference(x, g, weight_decay=lam, decoupled=True, **ADAM) for x, g in zip(init, grads)]
    compare_updates(m, "Adam(weight_decay=λ) vs L2-in-gradient Adam", got_l2, init, want_l2)
    compare_updates(m, "AdamW(weight_decay=λ) vs decoupled Adam", got_dec, init, want_dec)
    ref_gap = np.concatenate([(a - b).ravel() for a, b in zip(want_l2, want_dec)])
    got_gap = np.concatenate([(a - b).ravel() for a, b in zip(got_l2, got_dec)])
    update = np.concatenate([(a - x).ravel() for a, x in zip(want_dec, init)])
    relative_gap = np.abs(ref_gap).max() / np.abs(update).max()
    m.require("the formulas differ by ≥ 5% of the update", relative_gap >= 0.05,
              f"reference gap only {relative_gap:.2%} of the update")
    theta = np.concatenate([x.ravel() for x in want_dec])
    m.close("Adam(λ) − AdamW(λ) vs the formulas' difference", got_gap, ref_gap,
            100 * m.tol + 2 * rounding_allowance(m.dtype, theta, ref_gap, STEPS))
    m.note(f"Adam vs AdamW differ by {relative_gap:.1%} of the largest update after 5 steps")
    return m
