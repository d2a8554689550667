"""Weight penalties: values and autograd gradients against their formulas."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import SGD, AdamW, penalty_loss, snapshot_anchor


def param(values, device="cpu"):
    return tinysft.tensor(np.array(values, np.float64), device=device, requires_grad=True)


def grads_of(loss, params):
    for p in params:
        p.grad = None
    loss.backward()
    return [tinysft.tensor(p.grad).numpy() for p in params]


values = st.lists(st.sampled_from([0.0, 0.5, -1.5, 2.0, -0.25, 3.0]), min_size=1, max_size=6)


@given(theta=values, lam=st.floats(0.01, 2.0))
def test_l1_gradient_is_lambda_sign_with_sign0_equal_0(theta, lam):
    p = param(theta)
    loss = penalty_loss(SGD([{"params": [p], "penalty": "l1", "penalty_lambda": lam}], lr=0.1))
    assert loss.item() == pytest.approx(lam * np.abs(theta).sum())
    np.testing.assert_allclose(grads_of(loss, [p])[0], lam * np.sign(theta), rtol=1e-15)


@given(theta=values, lam=st.floats(0.01, 2.0))
def test_l2_gradient_is_2_lambda_theta(theta, lam):
    p = param(theta)
    loss = penalty_loss([{"params": [p], "penalty": "l2", "penalty_lambda": lam}])
    assert loss.item() == pytest.approx(lam * np.square(theta).sum())
    np.testing.assert_allclose(grads_of(loss, [p])[0], 2 * lam * np.array(theta), rtol=1e-15)


@given(theta0=values, shift=st.floats(-3.0, 3.0), lam=st.floats(0.01, 2.0))
def test_l2sp_pulls_towards_the_snapshot(theta0, shift, lam):
    p = param(theta0)
    opt = AdamW([{"params": [p], "penalty": "l2sp", "penalty_lambda": lam}])  # θ₀ copied here
    p.data += shift                                                          # "training" moves θ
    diff = p.data - np.array(theta0)
    loss = penalty_loss(opt)
    assert loss.item() == pytest.approx(lam * np.square(diff).sum(), abs=1e-12)
    np.testing.assert_allclose(grads_of(loss, [p])[0], 2 * lam * diff, rtol=1e-12, atol=1e-12)


def test_snapshot_anchor_retakes_theta0():
    p = param([1.0, 2.0])
    opt = SGD([{"params": [p], "penalty": "l2sp", "penalty_lambda": 1.0}], lr=0.1)
    p.data[:] = [5.0, 5.0]  # e.g. pretrained weights loaded after the optimizer was built
    assert penalty_loss(opt).item() == pytest.approx(16 + 9)
    snapshot_anchor(opt)
    assert penalty_loss(opt).item() == 0.0


def test_groups_sum_their_own_penalties():
    a, b, c, frozen = param([1.0, -2.0]), param([3.0]), param([0.5]), param([10.0])
    frozen.requires_grad = False
    opt = SGD([{"params": [a], "penalty": "l1", "penalty_lambda": 0.1},
               {"params": [b, frozen], "penalty": "l2", "penalty_lambda": 0.01},
               {"params": [c]}], lr=0.1)
    loss = penalty_loss(opt)
    assert loss.item() == pytest.approx(0.1 * 3 + 0.01 * 9)
    ga, gb = grads_of(loss, [a, b])
    np.testing.assert_allclose(ga, [0.1, -0.1])
    np.testing.assert_allclose(gb, [0.06])
    assert c.grad is None and frozen.grad is None


def test_no_penalty_is_a_zero_on_the_parameters_device(device):
    p = tinysft.tensor(np.ones(2, np.float32), device=device, requires_grad=True)
    q = tinysft.tensor(np.ones(2, np.float32), device=device, requires_grad=True)
    opt = SGD([{"params": [p]}, {"params": [q], "penalty": "l2", "penalty_lambda": 0.0}], lr=0.1)
    zero = penalty_loss(opt)
    assert zero.item() == 0.0 and zero.device == device and zero.dtype == np.float32
    assert not zero.requires_grad  # λ = 0 groups build no graph


def test_penalty_on_each_backend(device):
    p = tinysft.tensor(np.array([1.0, -2.0, 0.0], np.float32), device=device, requires_grad=True)
    opt = SGD([{"params": [p], "penalty": "l2sp", "penalty_lambda": 0.5}], lr=0.1)
    p.data += 1
    np.testing.assert_allclose(grads_of(penalty_loss(opt), [p])[0], [1.0, 1.0, 1.0])


def test_anchor_survives_state_dict():
    p = param([1.0, 2.0])
    opt = SGD([{"params": [p], "penalty": "l2sp", "penalty_lambda": 1.0}], lr=0.1)
    sd = opt.state_dict()
    q = param([0.0, 0.0])
    other = SGD([{"params": [q], "penalty": "l2sp", "penalty_lambda": 1.0}], lr=0.1)
    other.load_state_dict(sd)
    assert penalty_loss(other).item() == pytest.approx(1 + 4)


@pytest.mark.parametrize("group", [{"penalty": "l3", "penalty_lambda": 1.0}, {"penalty": "l2"},
                                   {"penalty": "l1", "penalty_lambda": -1.0},
                                   {"penalty": "l2sp", "penalty_lambda": 1.0, "penalty_anchor": [np.zeros(3)]}])
def test_bad_penalty_groups_are_rejected(group):
    with pytest.raises(ValueError):
        SGD([{"params": [param([1.0, 2.0])], **group}], lr=0.1)
