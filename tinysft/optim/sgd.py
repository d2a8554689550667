"""Stochastic gradient descent with momentum (``torch.optim.SGD``'s algorithm).

For each parameter θ with gradient g, at step t::

    g ← g + λθ                                     (weight_decay λ: L2 added to the gradient)
    b ← g                   if t = 1               (momentum μ > 0)
    b ← μb + (1 − τ)g       otherwise              (dampening τ)
    g ← g + μb  if nesterov, else  g ← b
    θ ← θ − γg                                     (lr γ)
"""
from .optimizer import Optimizer, scalar_type


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
        c = scalar_type(p.data, grad)
        rate, l2, mom, damp = c(lr), c(wd), c(mu), c(1 - tau)
        mul, add = p.xp.multiply, p.xp.add

        def piece(theta, g, buf, l2_grad, work):
            d = add(mul(theta, l2, out=l2_grad), g, out=l2_grad) if wd else g  # d = g + λθ
            if mu:
                if first:
                    buf[...] = d                                # b = g at t = 1
                else:
                    mul(buf, mom, out=buf)
                    add(buf, mul(d, damp, out=work) if tau else d, out=buf)  # b = μb + (1 − τ)g
                d = add(d, mul(buf, mom, out=work), out=work) if group["nesterov"] else buf
            theta -= mul(d, rate, out=work)

        self._foreach_piece(piece, p.data, grad, state["momentum_buffer"] if mu else None, like=1)  # g's dtype
