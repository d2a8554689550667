"""The optimizers, clipping and schedules against PyTorch itself, when it is installed (not in CI)."""
import math

import numpy as np
import pytest

import tinysft
from tinysft import optim

torch = pytest.importorskip("torch", reason="PyTorch is not installed; the hand-written formulas still apply")

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.02, "weight_decay": 0.3, "amsgrad": True}),
]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_optimizer_matches_torch(name, kwargs):
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(6)]
    mine = [tinysft.tensor(x.copy(), requires_grad=True) for x in init]
    theirs = [torch.tensor(x.copy(), requires_grad=True) for x in init]
    # two groups with different rates, the second at half the first
    opt = getattr(optim, name)([{"params": mine[:1]}, {"params": mine[1:], "lr": kwargs["lr"] / 2}], **kwargs)
    ref = getattr(torch.optim, name)([{"params": theirs[:1]}, {"params": theirs[1:], "lr": kwargs["lr"] / 2}],
                                     **kwargs)
    for step_grads in grads:
        for p, t, g in zip(mine, theirs, step_grads):
            p.grad, t.grad = g.copy(), torch.tensor(g)
        opt.step()
        ref.step()
    for p, t in zip(mine, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(np.float32) for s in [(300, 40), (7,), (2, 3, 4)]]
    mine = [tinysft.tensor(np.zeros_like(g), requires_grad=True) for g in grads]
    theirs = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for p, t, g in zip(mine, theirs, grads):
        p.grad, t.grad = g.copy(), torch.tensor(g)
    total = optim.clip_grad_norm_(mine, 1.0, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type)
    assert total == pytest.approx(expected.item(), rel=1e-5)
    for p, t in zip(mine, theirs):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_linear_schedule_matches_torch_lambda_lr():
    W, T = 3, 10
    param = torch.zeros(1, requires_grad=True)
    ref_opt = torch.optim.SGD([{"params": [param], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.4}])
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: t / W if t < W else max(0.0, (T - t) / (T - W)))
    opt = optim.SGD([{"params": [tinysft.tensor([0.0], requires_grad=True)], "lr": 0.1},
                     {"params": [tinysft.tensor([0.0], requires_grad=True)], "lr": 0.4}])
    sched = optim.LinearSchedule(opt, W, T)
    for _ in range(12):
        np.testing.assert_allclose(sched.get_last_lr(), ref.get_last_lr(), rtol=1e-15)
        ref_opt.step()
        ref.step()
        sched.step()
