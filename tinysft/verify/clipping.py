"""Gradient clipping by global norm and by value."""
import math

import numpy as np

from .registry import Measure, check

# torch's clip_grad_norm_ scales by c/(‖g‖ + 1e-6): the clipped norm is c·‖g‖/(‖g‖ + 1e-6), within 1e-6·c/‖g‖ of c
GUARD = 1e-6


def _clip_norm():
    from ..optim import clip_grad_norm_
    return clip_grad_norm_


def _clip_value():
    from ..optim import clip_grad_value_
    return clip_grad_value_


def _with_grads(grads, dtype):
    from ..tensor import Tensor
    params = []
    for g in grads:
        p = Tensor(np.zeros(g.shape, dtype=dtype), requires_grad=True)
        p.grad = np.array(g, dtype=dtype)
        params.append(p)
    return params


def _flat(arrays):
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


@check("clip_grad_norm", "clipping",
       formula="g ← g · min(1, c/(‖g‖ + 1e-6)), ‖g‖ over all tensors  ⇒  ‖g'‖ = min(‖g‖, c), g'/‖g'‖ = g/‖g‖",
       method="3 tensors, c = 1, ‖g‖ = 3c (clipped) and ‖g‖ = c/2 (untouched): returned norm, new norm, "
              "direction and every entry vs float64 (math.fsum)",
       explanation="""
       The global norm treats all gradients as one vector: ‖g‖ = √(Σ_tensors Σ g²). If ‖g‖ > c every
       entry is multiplied by the same s = c/‖g‖, so ‖s·g‖ = s‖g‖ = c and the direction g/‖g‖ is kept
       (only the step length changes). If ‖g‖ ≤ c nothing changes: s = min(1, c/‖g‖). PyTorch adds
       1e-6 to the denominator (no division by 0), so the clipped norm is c·‖g‖/(‖g‖ + 1e-6), within
       1e-6 relative of c here. An implementation that always scales by c/‖g‖ would blow small
       gradients up to norm c; the ‖g‖ = c/2 case catches that.
       """,
       impl=_clip_norm)
def check_clip_grad_norm(rng, dtype, impl):
    m = Measure(dtype)
    c = 1.0
    for case, target in (("‖g‖ = 3c", 3.0), ("‖g‖ = c/2", 0.5)):
        raw = [rng.standard_normal(s) for s in ((4, 5), (7,), (2, 3, 2))]
        norm0 = math.sqrt(math.fsum(float(x) ** 2 for g in raw for x in g.ravel()))
        grads = [np.asarray(g * (target / norm0), dtype=dtype).astype(np.float64) for g in raw]
        norm = math.sqrt(math.fsum(float(x) ** 2 for g in grads for x in g.ravel()))
        params = _with_grads(grads, dtype)
        returned = impl(params, c)
        after = _flat([p.grad for p in params])
        before = _flat(grads)
        m.close(f"{case}: returned norm vs ‖g‖ (before clipping)", float(returned), norm)
        m.close(f"{case}: every entry vs g·min(1, c/(‖g‖ + 1e-6))", after, before * min(1.0, c / (norm + GUARD)))
        new_norm = math.sqrt(math.fsum(float(x) ** 2 for x in after))
        m.close(f"{case}: ‖g'‖ vs min(‖g‖, c)", new_norm, min(norm, c), m.tol + GUARD)
        if new_norm > 0:
            m.close(f"{case}: direction g'/‖g'‖ vs g/‖g‖", after / new_norm, before / norm)
    return m


@check("clip_grad_value", "clipping",
       formula="g ← clamp(g, −c, c) elementwise  ⇒  |g'| ≤ c, entries inside [−c, c] unchanged",
       method="c = 0.5 on 3 tensors of N(0,1) gradients (about 60% of entries clipped): entries vs np.clip",
       explanation="""
       Clipping by value bounds each coordinate separately: g'_j = max(−c, min(c, g_j)). Unlike norm
       clipping it changes the direction of g whenever some but not all coordinates are clipped.
       """,
       impl=_clip_value)
def check_clip_grad_value(rng, dtype, impl):
    m = Measure(dtype)
    c = 0.5
    grads = [np.asarray(rng.standard_normal(s), dtype=dtype).astype(np.float64) for s in ((4, 5), (7,), (2, 3, 2))]
    params = _with_grads(grads, dtype)
    impl(params, c)
    after = _flat([p.grad for p in params])
    m.close("entries vs clamp(g, −c, c)", after, np.clip(_flat(grads), -c, c))
    m.require("max|g'| ≤ c", np.abs(after).max() <= c, f"max|g'| = {np.abs(after).max():.6g} > c = {c}")
    return m
