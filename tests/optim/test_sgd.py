"""SGD against its update rule, written out here in float64 NumPy."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import SGD


def sgd_reference(theta, grads, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's documented algorithm, one parameter, float64."""
    theta, buf = theta.astype(np.float64), None
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * theta
        if momentum:
            buf = g.copy() if t == 1 else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
    return theta


hyper = st.fixed_dictionaries({
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": st.sampled_from([0.0, 0.1]),
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.3]),
    "nesterov": st.booleans(),
})


@given(h=hyper, lrs=st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0)),
       steps=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_sgd_matches_formula_over_steps_and_groups(h, lrs, steps, seed):
    if h["nesterov"] and (h["momentum"] == 0 or h["dampening"]):
        h["nesterov"] = False
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for _ in range(steps)] for s in shapes]
    params = [tinysft.tensor(x.copy(), dtype=np.float64, requires_grad=True) for x in init]
    opt = SGD([{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}], **h)
    for k in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[k].copy()
        opt.step()
    for i, p in enumerate(params):
        lr = lrs[0] if i < 2 else lrs[1]
        expected = sgd_reference(init[i], grads[i], lr, **h)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-12)


def test_sgd_float32_on_each_backend(device):
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    p = tinysft.tensor(x.copy(), device=device, requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        p.grad = p.xp.asarray(g)
        opt.step()
    assert p.dtype == np.float32 and p.device == device
    assert opt.state[p]["momentum_buffer"].dtype == np.float32
    expected = sgd_reference(x, [g] * 3, 0.1, 0.9, 0.0, 0.01, False)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_sgd_does_not_touch_the_gradient():
    p = tinysft.tensor(np.ones(4), requires_grad=True)
    p.grad = np.full(4, 2.0)
    opt = SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1)
    opt.step()
    opt.step()
    np.testing.assert_array_equal(p.grad, np.full(4, 2.0))


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0},
                                    {"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}])
def test_sgd_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SGD([tinysft.tensor([1.0], requires_grad=True)], **kwargs)


def test_a_float64_gradient_on_a_float32_parameter_is_applied_in_float64():
    """θ − γg with g in float64 is computed in float64 (γ not rounded to float32), then stored as float32."""
    rng = np.random.default_rng(11)
    theta, grad = rng.standard_normal(300).astype(np.float32), rng.standard_normal(300)
    p = tinysft.tensor(theta.copy(), requires_grad=True)
    p.grad = grad.copy()
    SGD([p], lr=0.1).step()
    np.testing.assert_array_equal(p.data, (theta.astype(np.float64) - 0.1 * grad).astype(np.float32))
