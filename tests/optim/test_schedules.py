"""Learning-rate schedules: factors at known steps, ratios between groups, resume."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import (
    SGD,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    SlantedTriangular,
)


def make_opt(lrs=(0.1,)):
    return SGD([{"params": [tinysft.tensor([0.0], requires_grad=True)], "lr": lr} for lr in lrs])


def lrs_over(sched, steps):
    out = [sched.get_last_lr()]
    for _ in range(steps):
        sched.step()
        out.append(sched.get_last_lr())
    return out


def test_constant_with_warmup():
    lrs = lrs_over(ConstantSchedule(make_opt([2.0]), warmup_steps=4), 6)
    assert [lr[0] for lr in lrs] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert ConstantSchedule(make_opt([2.0])).get_last_lr() == [2.0]


def test_linear_warmup_then_decay():
    # W = 2, T = 10: t/W, then (T − t)/(T − W)
    lrs = [lr[0] for lr in lrs_over(LinearSchedule(make_opt([1.0]), 2, 10), 12)]
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(lrs, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_cosine_with_warmup(min_ratio):
    W, T = 3, 13
    lrs = [lr[0] for lr in lrs_over(CosineSchedule(make_opt([1.0]), W, T, min_ratio=min_ratio), 15)]
    expected = [t / W if t < W else
                min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - W) / (T - W))))
                for t in range(16)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-15, atol=1e-16)
    assert lrs[W] == 1.0
    assert lrs[(W + T) // 2] == pytest.approx(min_ratio + (1 - min_ratio) / 2)
    assert lrs[T] == lrs[-1] == pytest.approx(min_ratio)


def test_slanted_triangular_matches_the_paper():
    """ULMFiT eq. 3 with T = 100, cut_frac = 0.1, ratio = 32: lr/32 → lr at t = 10 → lr/32 at t = 100."""
    lrs = [lr[0] for lr in lrs_over(SlantedTriangular(make_opt([0.01]), 100), 110)]
    for t in (0, 5, 10, 55, 100, 110):
        p = t / 10 if t < 10 else max(0.0, 1 - (t - 10) / (10 * (1 / 0.1 - 1)))
        assert lrs[t] == pytest.approx(0.01 * (1 + p * 31) / 32, rel=1e-12)
    assert lrs[0] == pytest.approx(0.01 / 32) and lrs[10] == pytest.approx(0.01)
    assert lrs[100] == pytest.approx(0.01 / 32) and lrs[110] == pytest.approx(0.01 / 32)
    assert max(lrs) == lrs[10]


SCHEDULES = {
    "constant": lambda opt: ConstantSchedule(opt, warmup_steps=5),
    "linear": lambda opt: LinearSchedule(opt, 5, 40),
    "cosine": lambda opt: CosineSchedule(opt, 5, 40, min_ratio=0.05),
    "stlr": lambda opt: SlantedTriangular(opt, 40, cut_frac=0.2, ratio=10),
}


@pytest.mark.parametrize("name", SCHEDULES)
@given(lrs=st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=4), steps=st.integers(0, 45))
def test_groups_keep_their_ratios(name, lrs, steps):
    opt = make_opt(lrs)
    sched = SCHEDULES[name](opt)
    for _ in range(steps):
        sched.step()
    factor = sched.factor(steps)
    for group, lr in zip(opt.param_groups, lrs):
        assert group["lr"] == lr * factor
        assert group["initial_lr"] == lr
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("name", SCHEDULES)
def test_resume_continues_the_schedule(name):
    opt = make_opt([0.1, 0.3])
    sched = SCHEDULES[name](opt)
    for _ in range(7):
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    expected = lrs_over(sched, 5)

    fresh = make_opt([0.1, 0.3])
    fresh.load_state_dict(opt_state)
    resumed = SCHEDULES[name](fresh)  # finds each group's initial_lr, not its scheduled lr
    resumed.load_state_dict(sched_state)
    assert lrs_over(resumed, 5) == expected


@pytest.mark.parametrize("make", [lambda o: ConstantSchedule(o, -1), lambda o: LinearSchedule(o, 10, 10),
                                  lambda o: CosineSchedule(o, 0, 10, min_ratio=2.0),
                                  lambda o: SlantedTriangular(o, 5, cut_frac=0.1),
                                  lambda o: SlantedTriangular(o, 100, ratio=0.5)])
def test_bad_schedule_arguments(make):
    with pytest.raises(ValueError):
        make(make_opt())
