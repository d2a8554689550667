"""Adam and AdamW (``torch.optim.Adam`` / ``torch.optim.AdamW``'s algorithms).

One implementation; ``decoupled_weight_decay`` chooses how weight decay λ acts
(fastai's ``decouple_wd``). For each parameter θ with gradient g, at step t::

    g ← g + λθ                      if not decoupled  (Adam: L2 added to the gradient)
    θ ← θ − γλθ                     if decoupled      (AdamW, Loshchilov & Hutter 2019)
    m ← β₁m + (1 − β₁)g
    v ← β₂v + (1 − β₂)g²
    v̂max ← max(v̂max, v)             if amsgrad; then v stands for v̂max below
    θ ← θ − γ/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

ε is added outside the square root, after bias correction, as in PyTorch.
The update runs in place on ``p.data``, piece by cache-sized piece, with two
reusable work buffers.
"""
import math

from .optimizer import Optimizer


class Adam(Optimizer):
    """Adam; state per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, decoupled_weight_decay=False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Adam needs lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Adam needs betas in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": amsgrad, "decoupled_weight_decay": decoupled_weight_decay})

    def _update(self, p, grad, state, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        amsgrad, decoupled = group["amsgrad"], group["decoupled_weight_decay"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = p.xp.zeros_like(p.data)
            state["exp_avg_sq"] = p.xp.zeros_like(p.data)
            if amsgrad:
                state["max_exp_avg_sq"] = p.xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        step_size, bc2_sqrt = lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)
        xp = p.xp
        for theta, g, m, v, v_max in self._chunks(p.data, grad, state["exp_avg"], state["exp_avg_sq"],
                                                  state.get("max_exp_avg_sq") if amsgrad else None):
            work = self._scratch(theta, slot=1)
            if wd and decoupled:
                theta *= 1 - lr * wd                                        # θ ← θ − γλθ
            elif wd:
                g = xp.add(g, xp.multiply(theta, wd, out=work), out=self._scratch(theta))  # g + λθ
            m *= beta1
            m += xp.multiply(g, 1 - beta1, out=work)                        # m ← β₁m + (1 − β₁)g
            v *= beta2
            work = xp.multiply(g, g, out=work)
            work *= 1 - beta2
            v += work                                                       # v ← β₂v + (1 − β₂)g²
            if amsgrad:
                v = xp.maximum(v_max, v, out=v_max)
            # m/(√v/b + ε) = b·m/(√v + ε·b), b = √(1 − β₂ᵗ): the bias correction costs no pass
            denom = xp.sqrt(v, out=work)
            denom += eps * bc2_sqrt
            update = xp.divide(m, denom, out=work)
            update *= step_size * bc2_sqrt
            theta -= update


class AdamW(Adam):
    """Adam with decoupled weight decay: θ ← θ − γλθ before the Adam update (default λ = 0.01)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True)
