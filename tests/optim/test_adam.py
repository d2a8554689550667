"""Adam / AdamW against their update rules, written out here in float64 NumPy."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import Adam, AdamW


def adam_reference(theta, grads, lr, betas, eps, weight_decay, amsgrad, decoupled):
    """torch.optim.Adam / AdamW's documented algorithm, one parameter, float64."""
    beta1, beta2 = betas
    theta = theta.astype(np.float64)
    m, v, vmax = np.zeros_like(theta), np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            theta = theta - lr * weight_decay * theta
        else:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        if amsgrad:
            vmax = np.maximum(vmax, v)
            v_hat = vmax / (1 - beta2 ** t)
        else:
            v_hat = v / (1 - beta2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


hyper = st.fixed_dictionaries({
    "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.9), (0.0, 0.5)]),
    "eps": st.sampled_from([1e-8, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.5]),
    "amsgrad": st.booleans(),
})


@pytest.mark.parametrize("cls, decoupled", [(Adam, False), (AdamW, True)])
@given(h=hyper, lrs=st.tuples(st.floats(1e-4, 0.1), st.floats(1e-4, 0.1)),
       steps=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_adam_matches_formula_over_steps_and_groups(cls, decoupled, h, lrs, steps, seed):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (6,), (1,)]
    init = [rng.standard_normal(s) for s in shapes]
    # gradients of mixed scale, some exactly zero, so that eps and amsgrad's max both matter
    grads = [[rng.standard_normal(s) * rng.choice([0.0, 1e-3, 1.0, 10.0]) for _ in range(steps)]
             for s in shapes]
    params = [tinysft.tensor(x.copy(), dtype=np.float64, requires_grad=True) for x in init]
    opt = cls([{"params": params[:1], "lr": lrs[0]}, {"params": params[1:], "lr": lrs[1]}], **h)
    for k in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[k].copy()
        opt.step()
    for i, p in enumerate(params):
        lr = lrs[0] if i < 1 else lrs[1]
        expected = adam_reference(init[i], grads[i], lr, decoupled=decoupled, **h)
        np.testing.assert_allclose(p.data, expected, rtol=1e-11, atol=1e-12)
    assert opt.state[params[0]]["step"] == steps


def test_first_adam_step_moves_each_weight_by_lr():
    """With bias correction, step 1 is θ − lr·g/(|g| + ε): every weight moves by ≈ lr."""
    p = tinysft.tensor(np.zeros(3), requires_grad=True)
    p.grad = np.array([1e-4, -2.0, 300.0])
    Adam([p], lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(p.data, [-0.01, 0.01, -0.01], rtol=1e-7)


def test_adamw_decay_is_decoupled_from_the_gradient():
    """A zero gradient leaves only the decay: θ ← θ(1 − lr·λ) for AdamW; Adam's L2 moves θ by ≈ lr."""
    w = tinysft.tensor(np.full(2, 2.0), requires_grad=True)
    a = tinysft.tensor(np.full(2, 2.0), requires_grad=True)
    w.grad, a.grad = np.zeros(2), np.zeros(2)
    AdamW([w], lr=0.1, weight_decay=0.5).step()
    Adam([a], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(w.data, 2.0 * (1 - 0.1 * 0.5))
    np.testing.assert_allclose(a.data, 2.0 - 0.1, rtol=1e-7)


def test_adam_float32_on_each_backend(device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    gs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
    p = tinysft.tensor(x.copy(), device=device, requires_grad=True)
    opt = AdamW([p], lr=1e-2, weight_decay=0.1, amsgrad=True)
    for g in gs:
        p.grad = p.xp.asarray(g)
        opt.step()
    assert p.dtype == np.float32 and p.device == device
    assert all(opt.state[p][k].dtype == np.float32 for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    expected = adam_reference(x, gs, 1e-2, (0.9, 0.999), 1e-8, 0.1, True, True)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_adam_does_not_touch_the_gradient():
    p = tinysft.tensor(np.ones(4), requires_grad=True)
    p.grad = np.full(4, 2.0)
    opt = Adam([p], weight_decay=0.1)
    opt.step()
    np.testing.assert_array_equal(p.grad, np.full(4, 2.0))


def test_adamw_is_adam_with_the_switch():
    opt = AdamW([tinysft.tensor([1.0], requires_grad=True)])
    assert isinstance(opt, Adam)
    assert opt.defaults["decoupled_weight_decay"] is True and opt.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)},
                                    {"eps": -1.0}, {"weight_decay": -0.1}])
def test_adam_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        Adam([tinysft.tensor([1.0], requires_grad=True)], **kwargs)


def test_bias_correction_uses_each_parameters_own_step_count():
    """A parameter that got no gradient for a while starts its own count at 1."""
    a = tinysft.tensor(np.zeros(1), requires_grad=True)
    b = tinysft.tensor(np.zeros(1), requires_grad=True)
    opt = Adam([a, b], lr=0.1)
    a.grad = np.ones(1)
    opt.step()
    opt.step()
    b.grad = np.ones(1)
    opt.step()
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 1
    np.testing.assert_allclose(b.data, [-0.1], rtol=1e-6)
    assert math.isclose(a.data[0], -0.3, rel_tol=1e-6)
