"""Stochastic gradient descent with momentum (``torch.optim.SGD``'s algorithm).

For each parameter θ with gradient g, at step t::

    g ← g + λθ                                     (weight_decay λ: L2 added to the gradient)
    b ← g                   if t = 1               (momentum μ > 0)
    b ← μb + (1 − τ)g       otherwise              (dampening τ)
    g ← g + μb  if nesterov, else  g ← b
    θ ← θ − γg                                     (lr γ)
"""
from .optimizer import Optimizer


class SGD(Optimizer):
    """SGD; the state of a parameter is its ``momentum_buffer`` (when μ > 0)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def _update(self, p, grad, state, group):
        lr, mu, tau, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        first = mu and "momentum_buffer" not in state
        if first:
            state["momentum_buffer"] = p.xp.empty_like(p.data)
        for theta, g, buf in self._chunks(p.data, grad, state["momentum_buffer"] if mu else None):
            d = self._scratch(g)
            if wd:
                p.xp.multiply(theta, wd, out=d)
                d += g                                  # d = g + λθ
            else:
                d[...] = g
            if mu:
                if first:
                    buf[...] = d                        # b = g at t = 1
                else:
                    buf *= mu
                    if tau:
                        d *= 1 - tau                    # d is not needed undamped: nesterov forbids τ ≠ 0
                    buf += d                            # b = μb + (1 − τ)g
                if group["nesterov"]:
                    d += p.xp.multiply(buf, mu, out=self._scratch(g, slot=1))
                else:
                    d = buf
            theta -= p.xp.multiply(d, lr, out=self._scratch(g))
