"""LoRA: the adapted and the merged forward, and the adapter gradients dA and dB."""
import math

import numpy as np

from . import reference as ref
from .registry import Measure, check

N_IN, N_OUT, R, ALPHA = 12, 10, 4, 8.0


def _lora():
    from ..nn import lora
    return lora


def _layer(impl, rng, dtype, rslora=False, random_b=True, n_in=N_IN, n_out=N_OUT, r=R):
    """impl.LoRALinear around a random Linear; B drawn N(0, 1) unless ``random_b`` is False (then as built)."""
    from ..nn.layers import Linear
    base = Linear(n_in, n_out, generator=np.random.default_rng(rng.integers(2**63)), dtype=dtype)
    layer = impl.LoRALinear(base, r, ALPHA, 0.0, rslora=rslora, generator=np.random.default_rng(rng.integers(2**63)))
    if random_b:
        layer.lora_B.weight.data[...] = rng.standard_normal((n_out, r)).astype(dtype)
    return layer.eval()


def _parts(layer):
    """W, b, A, B as float64 (the values the implementation holds, so the reference sees no rounding of them)."""
    return [p.numpy().astype(np.float64) for p in (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)]


def _forward(layer, x, dtype):
    from ..tensor import Tensor
    return layer(Tensor(np.asarray(x, dtype=dtype))).numpy().astype(np.float64)


@check("lora_merge", "lora",
       formula="y = xWᵀ + b + s·(xAᵀ)Bᵀ, s = α/r (rsLoRA α/√r);  merged W' = W + s·BA gives the same y;  "
               "at init B = 0: y = xWᵀ + b",
       method=f"LoRALinear {N_IN}→{N_OUT}, r = {R}, α = {ALPHA:g}, x 6×{N_IN}: a fresh layer vs the base; with "
              "random B the forward (α/r and α/√r) vs the formula in float64; after merge() W' vs W + s·BA and the "
              "output vs the formula; unmerge() restores W within one rounding",
       explanation="""
       A LoRA layer adds a rank-r update to a frozen W: ΔW = s·BA with A (r, in), B (out, r). B starts at
       zero, so the adapted model starts as the base: y = xWᵀ + b exactly. By associativity
       (xAᵀ)Bᵀ = x(BA)ᵀ, so folding ΔW into the weight (merge) leaves y unchanged, up to rounding:
       y = x(W + s·BA)ᵀ + b. The scaling s = α/r keeps the update's size steady when r changes at a fixed
       α; rank-stabilised LoRA uses α/√r. Unmerging subtracts the same s·BA: W and W + s·BA are each
       rounded once, so |W_restored − W| ≤ ε·max(|W|, |W'|) elementwise (ε = 2⁻²³ in float32, 2⁻⁵² in
       float64), the tolerance of that part.
       """,
       impl=_lora)
def check_lora_merge(rng, dtype, impl):
    m = Measure(dtype)
    x = rng.standard_normal((6, N_IN)).astype(dtype).astype(np.float64)
    fresh = _layer(impl, rng, dtype, random_b=False)
    w, b, _, _ = _parts(fresh)
    got = _forward(fresh, x, dtype)
    m.close("fresh layer (B = 0) vs the base xWᵀ + b", got, x @ w.T + b)
    m.value("fresh layer vs its base Linear's own output: max |difference| (exactly equal)",
            np.abs(got - _forward(fresh.base_layer, x, dtype)).max(), 0.0)
    for rslora, s in ((False, ALPHA / R), (True, ALPHA / math.sqrt(R))):
        label = "α/√r" if rslora else "α/r"
        layer = _layer(impl, rng, dtype, rslora=rslora)
        w, b, a, bb = _parts(layer)
        want = x @ w.T + b + s * (x @ a.T) @ bb.T
        m.close(f"forward vs xWᵀ + b + s·(xAᵀ)Bᵀ, s = {label}", _forward(layer, x, dtype), want)
        layer.merge()
        merged_w = layer.weight.numpy().astype(np.float64)
        m.close(f"merged W' vs W + s·BA, s = {label}", merged_w, w + s * bb @ a)
        m.close(f"merged forward vs the formula, s = {label}", _forward(layer, x, dtype), want)
        layer.unmerge()
        scale = np.maximum(np.abs(w), np.abs(merged_w)) + np.finfo(dtype).tiny
        restored = layer.weight.numpy().astype(np.float64)
        m.value(f"unmerge: max |W_restored − W| / max(|W|, |W'|) elementwise, ≤ ε, s = {label}",
                (np.abs(restored - w) / scale).max(), float(np.finfo(dtype).eps))
    return m


@check("lora_gradients", "lora",
       formula="dB = s·gᵀ(xAᵀ),  dA = s·Bᵀgᵀx  (rows of x and g summed over),  no gradient for W, b",
       method="r = 3, α = 8, x 2×3×7 → 5 outputs, random upstream g: autograd's dA, dB vs the formulas in float64; "
              "W and b frozen; central differences of Σ w·y in x, A and B (2×7 → 4, r = 2, float64)",
       explanation="""
       With u = xAᵀ (N, r) and y = xWᵀ + b + s·uBᵀ, the upstream g = ∂L/∂y (N, out) gives
       ∂L/∂B = s·Σ_n g_n u_nᵀ = s·gᵀu (out, r) and ∂L/∂u = s·gB (N, r), hence
       ∂L/∂A = (∂L/∂u)ᵀx = s·Bᵀgᵀx (r, in). Leading axes of x are rows like any other. W and b are frozen:
       they must receive no gradient at all. Central differences then test the whole backward, x included,
       independently of these formulas.
       """,
       impl=_lora)
def check_lora_gradients(rng, dtype, impl):
    from ..nn.module import swap_parameters
    from ..tensor import Tensor
    m = Measure(dtype)
    layer = _layer(impl, rng, dtype, n_in=7, n_out=5, r=3)
    s = ALPHA / 3
    x = rng.standard_normal((2, 3, 7)).astype(dtype).astype(np.float64)
    g = rng.standard_normal((2, 3, 5)).astype(dtype).astype(np.float64)
    layer(Tensor(np.asarray(x, dtype=dtype))).backward(np.asarray(g, dtype=dtype))
    _, _, a, bb = _parts(layer)
    xf, gf = x.reshape(-1, 7), g.reshape(-1, 5)  # (N, in), (N, out)
    m.close("dB vs s·gᵀ(xAᵀ)", layer.lora_B.weight.grad, s * gf.T @ (xf @ a.T))
    m.close("dA vs s·Bᵀgᵀx", layer.lora_A.weight.grad, s * bb.T @ gf.T @ xf)
    m.require("W and b receive no gradient", layer.weight.grad is None and layer.bias.grad is None,
              "the frozen base weight or bias got a gradient")
    small = _layer(impl, rng, np.float64, n_in=7, n_out=4, r=2)

    def fn(x, a, b):
        with swap_parameters(small, {"lora_A.weight": a, "lora_B.weight": b}):
            return small(x)

    ref.autograd_vs_fd(m, fn, [rng.standard_normal((2, 7)), small.lora_A.weight.data, small.lora_B.weight.data],
                       rng, names=["x", "A", "B"])
    return m
