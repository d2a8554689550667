"""The Optimizer base: groups, zero_grad, skipped parameters, state_dict round trips."""
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import SGD, Adam, AdamW


def make_params(seed, shapes=((3, 2), (4,), (2, 2))):
    rng = np.random.default_rng(seed)
    return [tinysft.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in shapes]


def set_grads(params, rng):
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)


def test_groups_take_missing_hyperparameters_from_defaults():
    a, b, c = make_params(0)
    opt = SGD([{"params": [a], "lr": 0.5}, {"params": [b, c]}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(b), id(c)]
    opt.add_param_group({"params": make_params(1)[0], "momentum": 0.0})
    assert opt.param_groups[2]["lr"] == 0.1 and opt.param_groups[2]["momentum"] == 0.0


def test_a_parameter_in_two_groups_is_an_error():
    a, b, c = make_params(0)
    opt = Adam([{"params": [a, b]}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [c, b]})
    with pytest.raises(ValueError, match="more than once"):
        Adam([a, a])
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("params, error", [([], ValueError), (None, TypeError), ([np.ones(3)], TypeError)])
def test_bad_params_are_rejected(params, error):
    if params is None:
        params = make_params(0)[0]  # a single tensor, not an iterable of them
    with pytest.raises(error):
        SGD(params, lr=0.1)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    a, b, c = make_params(0)
    opt = SGD([a, b, c], lr=0.1)
    set_grads([a, b], np.random.default_rng(0))
    grad_a = a.grad
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert a.grad is None and b.grad is None
    else:
        assert a.grad is grad_a and not a.grad.any() and not b.grad.any()
    assert c.grad is None


@pytest.mark.parametrize("make_opt", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                      lambda ps: AdamW(ps, lr=0.1)])
def test_parameters_without_grad_are_skipped(make_opt):
    a, b, c = make_params(0)
    before = b.data.copy()
    opt = make_opt([a, b, c])
    set_grads([a, c], np.random.default_rng(0))
    opt.step()
    np.testing.assert_array_equal(b.data, before)  # not even weight decay touches it
    assert b not in opt.state


def test_step_returns_the_closures_value():
    a, = make_params(0, [(2,)])
    a.grad = np.ones(2, np.float32)
    assert SGD([a], lr=0.1).step(lambda: 3.5) == 3.5


def run(opt_factory, params, grads):
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.copy()
        opt.step()
    return opt


OPTIMIZERS = {
    "sgd": lambda ps: SGD([{"params": ps[:1], "lr": 0.05}, {"params": ps[1:]}], lr=0.1, momentum=0.9,
                          dampening=0.1, weight_decay=0.01),
    "nesterov": lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: Adam([{"params": ps[:2], "lr": 0.02}, {"params": ps[2:]}], weight_decay=0.1),
    "adamw_amsgrad": lambda ps: AdamW(ps, lr=0.03, amsgrad=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(seed=st.integers(0, 2**32 - 1), before=st.integers(1, 4), after=st.integers(1, 4))
def test_resume_from_state_dict_is_bit_identical(name, seed, before, after):
    rng = np.random.default_rng(seed)
    shapes = [(3, 2), (4,), (2, 2)]
    grads = [[rng.standard_normal(s).astype(np.float32) if rng.random() > 0.2 else None for s in shapes]
             for _ in range(before + after)]
    factory = OPTIMIZERS[name]

    straight = make_params(seed)
    run(factory, straight, grads)

    first = make_params(seed)
    saved = pickle.loads(pickle.dumps(run(factory, first, grads[:before]).state_dict()))
    resumed = [tinysft.tensor(p.data.copy(), requires_grad=True) for p in first]
    opt = factory(resumed)
    opt.load_state_dict(saved)
    for step_grads in grads[before:]:
        for p, g in zip(resumed, step_grads):
            p.grad = None if g is None else g.copy()
        opt.step()
    for p, q in zip(straight, resumed):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_format_and_independence():
    a, b = make_params(0, [(2,), (3,)])
    opt = Adam([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.2)
    a.grad = np.ones(2, np.float32)
    opt.step()
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert [g["lr"] for g in sd["param_groups"]] == [0.1, 0.2]
    assert set(sd["state"]) == {0} and sd["state"][0]["step"] == 1
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    m = sd["state"][0]["exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], m)  # a snapshot, not a view


def test_load_restores_hyperparameters_and_casts_state():
    a, = make_params(0, [(2,)])
    opt = SGD([a], lr=0.1, momentum=0.9)
    a.grad = np.ones(2, np.float32)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.01
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"].astype(np.float64)
    b, = make_params(0, [(2,)])
    other = SGD([b], lr=0.5, momentum=0.9)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.01 and other.param_groups[0]["params"][0] is b
    assert other.state[b]["momentum_buffer"].dtype == np.float32


def test_load_rejects_mismatched_groups():
    a, b, c = make_params(0)
    sd = SGD([{"params": [a]}, {"params": [b, c]}], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="2 parameter groups, but the optimizer has 1"):
        SGD([a, b, c], lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="group 1 has 1 parameters"):
        SGD([{"params": [a]}, {"params": [b]}], lr=0.1).load_state_dict(sd)


def test_load_rejects_state_of_the_wrong_shape_and_keeps_its_own():
    a, = make_params(0, [(2,)])
    opt = SGD([a], lr=0.1, momentum=0.9)
    a.grad = np.ones(2, np.float32)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state[a]["momentum_buffer"], np.ones(2))


def test_state_moves_to_the_parameters_device(device):
    a = tinysft.tensor(np.ones(3, np.float32), device=device, requires_grad=True)
    opt = Adam([a])
    a.grad = a.xp.ones(3, dtype=np.float32)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {k: tinysft.tensor(v).numpy() if hasattr(v, "shape") else v
                      for k, v in sd["state"][0].items()}  # as if saved to disk from NumPy
    b = tinysft.tensor(np.ones(3, np.float32), device=device, requires_grad=True)
    other = Adam([b])
    other.load_state_dict(sd)
    assert type(other.state[b]["exp_avg"]) is type(b.data)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("workers", [1, 3])
def test_piecewise_update_is_bit_identical_to_whole_arrays(name, workers, monkeypatch):
    """Large parameters are updated in cache-sized pieces, shared out over threads; neither the
    pieces nor the threads may change a bit.

    Also covers a float64 parameter among float32 ones and a non-contiguous parameter (a
    transposed view), which is updated whole.
    """
    from tinysft import threads
    from tinysft.optim import optimizer
    rng = np.random.default_rng(3)
    shapes = [(7, 3), (11,), (2, 5)]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    def fresh():
        params = make_params(3, shapes)
        params[1] = tinysft.tensor(params[1].data.astype(np.float64), requires_grad=True)
        params[2] = tinysft.tensor(np.ascontiguousarray(params[2].data.T).T, requires_grad=True)
        return params

    whole = fresh()
    run(OPTIMIZERS[name], whole, grads)  # small arrays: one piece each, on this thread
    monkeypatch.setattr(optimizer, "CHUNK", 4)
    monkeypatch.setattr(threads, "MIN_PARALLEL", 1)
    seen = set()  # the threads that ran pieces
    split = optimizer.Optimizer._foreach_piece

    def watched(self, update, *arrays, **kwargs):
        split(self, lambda *pieces: seen.add(threading.get_ident()) or update(*pieces), *arrays, **kwargs)

    monkeypatch.setattr(optimizer.Optimizer, "_foreach_piece", watched)
    before = threads.num_threads()
    threads.set_num_threads(workers)
    try:
        pieces = fresh()
        assert not pieces[2].data.flags.c_contiguous
        run(OPTIMIZERS[name], pieces, grads)
    finally:
        threads.set_num_threads(before)
    assert (len(seen) > 1) == (workers > 1)  # blocks after the first go to the pool's threads
    for p, q in zip(whole, pieces):
        np.testing.assert_array_equal(p.data, q.data)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_float64_parameter_among_float32_ones_keeps_its_precision(name):
    """Work buffers are per dtype: a float32 neighbour's must not round a float64 update.
    The same float64 parameter is updated beside a float32 one, then beside one without a gradient."""
    rng = np.random.default_rng(5)
    shapes = [(6, 5), (7,), (3,)]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    mixed = make_params(5, shapes)
    mixed[1] = tinysft.tensor(rng.standard_normal(7), requires_grad=True)  # float64
    alone = [tinysft.tensor(p.data.copy(), requires_grad=True) for p in mixed]
    run(OPTIMIZERS[name], mixed, grads)
    run(OPTIMIZERS[name], alone, [[None, g[1], None] for g in grads])
    np.testing.assert_array_equal(mixed[1].data, alone[1].data)
