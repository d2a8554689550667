"""The decoder's building blocks: RMSNorm, rotary embeddings, SwiGLU, causal grouped-query attention."""
import math

import numpy as np

from . import reference as ref
from .registry import Measure, check

# rope_cache returns float32 tables by design: each entry is cos/sin rounded to float32 (≤ 6e-8 off)
TABLE_TOL = 2e-7


def _functional():
    from .. import functional
    return functional


def _leaves(dtype, *arrays):
    from ..tensor import Tensor
    return [Tensor(np.array(a, dtype=dtype), requires_grad=True) for a in arrays]


def _as_run(array, dtype):
    """The inputs exactly as the implementation sees them, in float64 for the reference."""
    return np.asarray(array, dtype=dtype).astype(np.float64)


@check("rms_norm", "decoder",
       formula="y = x/√(mean(x²) + ε)·w over the last axis;  dx = r(dx̂ − x̂·mean(dx̂·x̂)), dx̂ = g·w;  dw = Σ g·x̂",
       method="8×16 rows, two of them of scale 1e-3 (where ε matters): values vs the formula; gradients vs the "
              "explicit Jacobian r(I − x̂x̂ᵀ/D) and vs central differences (3×6, float64)",
       explanation="""
       r = 1/√(m + ε) with m = mean(x²) = Σx²/D, and x̂ = x·r; no mean is subtracted (unlike LayerNorm).
       ∂r/∂x_j = −½(m + ε)^(−3/2)·2x_j/D = −r³x_j/D, so ∂x̂_i/∂x_j = r·δ_ij − x_i r³x_j/D = r(δ_ij − x̂_i x̂_j/D).
       Applied to dx̂ = g·w: dx = r(dx̂ − x̂·Σ_j(dx̂_j x̂_j)/D), the fused backward. ∂y/∂w = x̂, summed over rows.
       ε sits inside the square root: at scale 1e-3, mean(x²) ≈ 1e-6 is smaller than ε = 1e-5, so
       ε outside the root (x/(√m + ε)) gives a visibly different answer there.
       """,
       impl=_functional)
def check_rms_norm(rng, dtype, impl):
    m = Measure(dtype)
    eps = 1e-5
    x = rng.standard_normal((8, 16)) * 2 + 0.3
    x[:2] *= 1e-3
    x, w = _as_run(x, dtype), _as_run(1 + 0.2 * rng.standard_normal(16), dtype)
    leaves = _leaves(dtype, x, w)
    out = impl.rms_norm(*leaves, eps=eps)
    g = rng.standard_normal(out.shape)
    out.backward(np.asarray(g, dtype=dtype))
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * r
    m.close("y vs x/√(mean(x²) + ε)·w", out, xhat * w)
    d = x.shape[1]
    dx = np.stack([r[i, 0] * (np.eye(d) - np.outer(xhat[i], xhat[i]) / d) @ (g[i] * w) for i in range(len(x))])
    m.close("∂/∂x vs Jacobian r(I − x̂x̂ᵀ/D) applied to g·w", leaves[0].grad, dx)
    m.close("∂/∂w vs Σ_rows g·x̂", leaves[1].grad, (g * xhat).sum(0))
    ref.autograd_vs_fd(m, lambda a, b: impl.rms_norm(a, b, eps=eps), [x[:3, :6], w[:6]], rng, names=["x", "w"])
    return m


def _rotations(cos, sin):
    """The 2×2 matrices [[c, −s], [s, c]] of every table entry: (..., D/2, 2, 2)."""
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _pairs(x):
    """x (..., D) as its rotated pairs (x_i, x_{i+D/2}): (..., D/2, 2)."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], -1)


def _unpairs(p):
    return np.concatenate([p[..., 0], p[..., 1]], -1)


@check("rope_rotation", "decoder",
       formula="(y_i, y_{i+D/2}) = R(p·θ_i)(x_i, x_{i+D/2}), R(α) = [[cos α, −sin α], [sin α, cos α]], "
               "θ_i = base^(−2i/D);  ‖y‖ = ‖x‖;  ⟨rope(q, m), rope(k, n)⟩ depends only on m − n",
       method="B=2, H=3, T=5, D=8, positions up to 4000, base 1e5: tables vs math.cos/sin; values vs the 2×2 "
              "matrices; norms; scores at (m, n) vs (m + s, n + s); gradient vs Rᵀg and central differences",
       explanation="""
       Rotary embeddings rotate each pair (x_i, x_{i+D/2}) (Hugging Face's "rotate_half" layout) by the
       angle p·θ_i. A rotation keeps lengths, and R(α)ᵀR(β) = R(β − α), so
       ⟨R(mθ)q, R(nθ)k⟩ = qᵀR((n − m)θ)k: attention scores see only the relative position.
       The backward is the transpose of the forward map, Rᵀ = R(−α): the inverse rotation of g.
       The tables are float32 (each entry ≤ 6e-8 from the exact cos/sin), so the table, norm and
       relative-position parts have tolerance 2e-7; the rotation itself is checked against matrices built
       from the tables' own values, at the dtype's formula tolerance.
       """,
       impl=_functional)
def check_rope_rotation(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    base, dim = 1e5, 8
    positions = rng.integers(0, 4000, (2, 5))
    cos, sin = impl.rope_cache(positions, dim, base)
    angles = positions[..., None] * np.array([base ** (-2 * i / dim) for i in range(dim // 2)])  # (B, T, D/2)
    m.close("cos table vs math.cos(p·base^(−2i/D))", np.asarray(cos)[:, 0],
            np.vectorize(math.cos)(angles), TABLE_TOL)
    m.close("sin table vs math.sin(p·base^(−2i/D))", np.asarray(sin)[:, 0],
            np.vectorize(math.sin)(angles), TABLE_TOL)

    x = _as_run(rng.standard_normal((2, 3, 5, dim)), dtype)
    (leaf,) = _leaves(dtype, x)
    y = impl.rope(leaf, cos, sin)
    g = rng.standard_normal(y.shape)
    y.backward(np.asarray(g, dtype=dtype))
    rotations = _rotations(np.asarray(cos, np.float64), np.asarray(sin, np.float64))  # (B, 1, T, D/2, 2, 2)
    m.close("y vs R(p·θ_i) applied to each pair", y, _unpairs(np.einsum("...ij,...j->...i", rotations, _pairs(x))))
    norms = np.linalg.norm(x, axis=-1)
    m.close("‖y‖ vs ‖x‖ per vector", np.linalg.norm(y.numpy().astype(np.float64), axis=-1), norms,
            max(TABLE_TOL, m.tol))
    m.close("∂/∂x vs Rᵀg (the inverse rotation)", leaf.grad,
            _unpairs(np.einsum("...ji,...j->...i", rotations, _pairs(g))))

    q, k = rng.standard_normal((2, dim))

    def score(i, j):
        (cos_i, sin_i), (cos_j, sin_j) = impl.rope_cache(np.array([i]), dim, base), impl.rope_cache(np.array([j]), dim, base)
        rq = impl.rope(Tensor(q.reshape(1, 1, 1, dim)), cos_i, sin_i).numpy()
        rk = impl.rope(Tensor(k.reshape(1, 1, 1, dim)), cos_j, sin_j).numpy()
        return float((rq * rk).sum())

    pairs = [tuple(int(p) for p in rng.integers(0, 500, 3)) for _ in range(6)]
    m.close("⟨rope(q, m), rope(k, n)⟩ vs the same at (m + s, n + s)",
            [score(a + s, b + s) for a, b, s in pairs], [score(a, b) for a, b, _ in pairs], TABLE_TOL * 10)
    m.require("the scores do depend on m − n", abs(score(0, 3) - score(0, 0)) > 1e-3,
              "⟨rope(q, 0), rope(k, 3)⟩ = ⟨rope(q, 0), rope(k, 0)⟩: positions are ignored")
    small_cos, small_sin = impl.rope_cache(np.array([3, 11]), 4, base)
    ref.autograd_vs_fd(m, lambda a: impl.rope(a, small_cos, small_sin), [rng.standard_normal((1, 2, 2, 4))], rng,
                       names=["x"])
    return m


@check("swiglu", "decoder",
       formula="y = silu(a)·u, silu(a) = a·σ(a);  ∂y/∂a = u·σ(a)(1 + a(1 − σ(a))),  ∂y/∂u = a·σ(a)",
       method="a at 65 points in [−8, 8] plus ±50: values and gradients vs the formula with math.exp; "
              "gradients vs central differences (float64)",
       explanation="""
       σ(a) = 1/(1 + e^(−a)) and σ' = σ(1 − σ). Product rule on a·σ(a): σ + a·σ(1 − σ) = σ(1 + a(1 − σ)),
       then times the up projection u. The gradient for u is the gate's value silu(a).
       Far out the gate saturates: silu(50) = 50 with slope 1, silu(−50) ≈ −1e−20 with slope ≈ 0,
       and nothing overflows.
       """,
       impl=_functional)
def check_swiglu(rng, dtype, impl):
    m = Measure(dtype)
    a = _as_run(np.concatenate([np.linspace(-8, 8, 65), [-50.0, 50.0]]), dtype)
    u = _as_run(rng.standard_normal(a.shape), dtype)
    leaves = _leaves(dtype, a, u)
    y = impl.swiglu(*leaves)
    g = rng.standard_normal(y.shape)
    y.backward(np.asarray(g, dtype=dtype))
    sigma = np.array([1 / (1 + math.exp(-v)) for v in a])
    m.close("y vs a·σ(a)·u", y, a * sigma * u)
    m.close("∂/∂a vs g·u·σ(1 + a(1 − σ))", leaves[0].grad, g * u * sigma * (1 + a * (1 - sigma)))
    m.close("∂/∂u vs g·a·σ(a)", leaves[1].grad, g * a * sigma)
    ref.autograd_vs_fd(m, impl.swiglu, [a[::6], u[::6]], rng, names=["a", "u"])
    return m


def _attention_reference(q, k, v, allowed):
    """Per batch, query head h (kv head h // G) and query row: softmax over the allowed keys only."""
    batch, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for b, h, i in np.ndindex(batch, heads, length):
        keys = np.flatnonzero(allowed[b, 0, i])
        if keys.size:
            scores = k[b, h // groups, keys] @ q[b, h, i] / math.sqrt(dim)
            p = np.exp(scores - scores.max())
            out[b, h, i] = (p / p.sum()) @ v[b, h // groups, keys]
    return out


@check("causal_attention", "decoder",
       formula="y_i = Σ_j p_ij v_j, p_i = softmax over the allowed j ≤ S − T + i of q_i·k_j/√Dh, query head h "
               "reading kv head h // G;  ∂y_i/∂k_j = ∂y_i/∂v_j = 0 for j > S − T + i",
       method="B=2, Hq=6, Hkv=2, T=4, S=6, Dh=8, padded keys (one row with none left): values vs a per-head loop; "
              "each row's gradient for later keys and values exactly 0; T=1 with a cache = the last row; "
              "central differences (B=1, Hq=2, Hkv=1, T=2, S=3, float64)",
       explanation="""
       Query i of the T new positions sits at absolute position S − T + i and may read keys 0 … S − T + i
       (with a KV cache, S − T keys come from earlier steps); padded keys are hidden too. Masked scores
       are −∞ before the softmax, so their probabilities are exactly 0, and so are the gradients they pass
       back: y_i does not depend on any later key or value at all, not even through rounding. A row
       with no allowed key returns 0. With G query heads per kv head (grouped-query attention), query
       head h uses kv head h // G, and each kv head's gradient is the sum over its G query heads.
       """,
       impl=_functional)
def check_causal_attention(rng, dtype, impl):
    m = Measure(dtype)
    batch, kv_heads, groups, length, keys, dim = 2, 2, 3, 4, 6, 8
    q = _as_run(rng.standard_normal((batch, kv_heads * groups, length, dim)), dtype)
    k, v = (_as_run(rng.standard_normal((batch, kv_heads, keys, dim)), dtype) for _ in range(2))
    padding = np.ones((batch, keys), bool)
    padding[0, 3] = False
    padding[1, :3] = False  # query 0 of batch 1 (position 2) sees keys 0–2: all padded
    mask = np.asarray(impl.causal_mask(length, keys, key_padding=padding))
    allowed = (np.arange(keys)[None, :] <= np.arange(keys - length, keys)[:, None])[None, None] \
        & padding[:, None, None, :]
    m.require("mask = causal ∧ padding", mask.shape == allowed.shape and bool((mask == allowed).all()),
              f"causal_mask gives {mask.astype(int).tolist()}, expected {allowed.astype(int).tolist()}")

    y = impl.attention(*_leaves(dtype, q, k, v), mask)
    want = _attention_reference(q, k, v, allowed)
    m.close("y vs the per-head softmax loop", y, want)
    m.require("a row without keys gives 0", bool((y.numpy()[1, :, 0] == 0).all()), "the row is not 0 (or NaN)")

    leaking = 0.0
    for i in range(length):
        qi, ki, vi = _leaves(dtype, q, k, v)
        out = impl.attention(qi, ki, vi, mask)
        (out[:, :, i] * float(rng.standard_normal())).sum().backward()
        future = keys - length + i + 1
        leaking = max(leaking, float(np.abs(ki.grad[:, :, future:]).max(initial=0)),
                      float(np.abs(vi.grad[:, :, future:]).max(initial=0)))
    m.value("max |∂y_i/∂k_j|, |∂y_i/∂v_j| over j > S − T + i (must be exactly 0)", leaking, 0.0)

    step = impl.attention(*_leaves(dtype, q[:, :, -1:], k, v), np.asarray(impl.causal_mask(1, keys, key_padding=padding)))
    m.close("T=1 against the cache vs the last row", step, want[:, :, -1:])

    small = [rng.standard_normal(s) for s in [(1, 2, 2, 2), (1, 1, 3, 2), (1, 1, 3, 2)]]
    small_mask = np.asarray(impl.causal_mask(2, 3))
    ref.autograd_vs_fd(m, lambda a, b, c: impl.attention(a, b, c, small_mask), small, rng, names=["q", "k", "v"])
    return m
