"""The hand-written CUDA kernels (csrc/) against the same formulas as the NumPy code.

With a GPU (CuPy) they run on it; without one they run on the CPU through the
emulator, which compiles the unchanged .cu files with g++ on first use (cached).
If neither works the checks are *skipped*, with the reason: never passed.
The implementation hook is a namespace with ``softmax_cross_entropy``,
``clip_grad_norm``, ``xp`` (the array module) and ``backend`` (a label).
"""
import math
import shutil
from types import SimpleNamespace

import numpy as np

from . import reference as ref
from .registry import FORMULA_TOL, Measure, Skip, check

KERNEL_DTYPE = "float32"  # the kernels take float32 only, whatever --dtype says


def _kernels():
    from ..cuda import kernels  # ImportError: not written yet -> skipped
    if kernels.is_cupy_available():
        import cupy
        return SimpleNamespace(softmax_cross_entropy=kernels.softmax_cross_entropy,
                               clip_grad_norm=kernels.clip_grad_norm, xp=cupy, backend="CuPy (GPU)")
    if shutil.which("g++") is None:
        raise Skip("no GPU, and no g++ to build the CPU emulator")
    try:
        be = kernels.get_backend("emulator", np.zeros(1, np.float32))
        be.function("cross_entropy.cu", "cross_entropy_fwd_bwd")
        be.function("clip.cu", "clip_sumsq")
    except Exception as error:  # compiler errors, missing sources, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Skip(f"the CUDA emulator could not build the kernels: {first}") from error
    return SimpleNamespace(softmax_cross_entropy=kernels.softmax_cross_entropy,
                           clip_grad_norm=kernels.clip_grad_norm, xp=np, backend="emulator (CPU)")


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def ce_formula(x, t, ignore_index, eps, z, row_scale):
    """Per-row loss, lse and d(Σ_i loss_i·row_scale)/dx, float64, written from the stated formula."""
    v = x.shape[1]
    valid = t != ignore_index
    lse = np.logaddexp.reduce(x, axis=1)
    logp = x - lse[:, None]
    y = (1 - eps) * ref.one_hot(np.where(valid, t, 0), v) + eps / v
    with np.errstate(invalid="ignore"):  # 0·(−inf) for a masked class with ε = 0
        ce = -np.where(y > 0, y * logp, 0.0).sum(axis=1)
    loss = np.where(valid, ce + z * lse ** 2, 0.0)
    p = np.exp(logp)
    grad = row_scale * (p * (1 + 2 * z * lse[:, None]) - y) * valid[:, None]
    return loss, lse, grad


@check("kernel_cross_entropy", "kernels",
       formula="loss_i = −Σ_c y_ic log p_ic + z·lse_i², y = (1−ε)onehot + ε/V;  "
               "dlogits_i = s·(p_i(1 + 2z·lse_i) − y_i), s = 1/|V| by default",
       method="csrc/cross_entropy.cu on CuPy or the emulator, float32: 3 cases (ignore rows; ε = 0.1, z = 1e-4, "
              "s = 0.5; logits ±1e4 and −inf) vs the formula in float64",
       explanation="""
       The kernel fuses forward and backward: one block per row computes m = max x and
       s = Σ e^(x − m) in one online pass (lse = m + log s), then writes the loss and the gradient.
       The z-loss z·lse² (PaLM) pushes log Z towards 0; its derivative is 2z·lse·∂lse/∂x = 2z·lse·p,
       hence p(1 + 2z·lse). With row_scale s = 1/|V| the gradient is that of the mean loss over the
       non-ignored rows — the same (p − y)/N as the NumPy path (see cross_entropy).
       """,
       impl=_kernels)
def check_kernel_cross_entropy(rng, dtype, impl):
    m = Measure(KERNEL_DTYPE)
    m.note(f"ran on {impl.backend}")
    n, v = 24, 37
    x = (3 * rng.standard_normal((n, v))).astype(np.float32)
    t = rng.integers(0, v, n)
    t[[2, 9]] = -100
    extreme = np.full((4, v), -1e4, np.float32)
    extreme[0, 3], extreme[1, :5], extreme[2, ::2], extreme[3, :] = 1e4, 1e4 - np.arange(5), -np.inf, 0.0
    extreme[3, 7] = -np.inf
    cases = [("ignore_index rows", x, t, dict(ignore_index=-100)),
             ("ε = 0.1, z = 1e-4, s = 0.5", x, np.where(t < 0, -1, t),
              dict(ignore_index=-1, label_smoothing=0.1, z_loss=1e-4, row_scale=0.5)),
             ("logits ±1e4, −inf", extreme, np.array([3, 1, 1, 0]), dict(ignore_index=-100))]
    for label, logits, targets, kw in cases:
        valid = targets != kw["ignore_index"]
        scale = kw.get("row_scale", 1.0 / valid.sum())
        want_loss, want_lse, want_grad = ce_formula(logits.astype(np.float64), targets, kw["ignore_index"],
                                                    kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), scale)
        loss, lse, grad = impl.softmax_cross_entropy(impl.xp.asarray(logits), impl.xp.asarray(targets), **kw)
        m.close(f"{label}: loss rows", _host(loss), want_loss)
        m.close(f"{label}: lse", _host(lse), want_lse)
        m.close(f"{label}: dlogits", _host(grad), want_grad)
        if label == "ignore_index rows":
            m.close(f"{label}: mean loss Σ loss_i/|V| vs −(1/N)ΣΣ y log p",
                    _host(loss).astype(np.float64).sum() / valid.sum(), want_loss.sum() / valid.sum())
    return m


@check("kernel_clip_grad_norm", "kernels",
       formula="‖g‖ = √(Σ_tensors Σ g²) (float64 accumulation);  g ← g·min(1, c/(‖g‖ + 1e-6));  "
               "non-finite ‖g‖: g untouched, flag set",
       method="csrc/clip.cu on CuPy or the emulator: 3 float32 tensors (one spanning 3 chunks), ‖g‖ = 3c and "
              "c/2, and one with an inf, vs math.fsum in float64",
       explanation="""
       The kernel sums squares per chunk in float64, reduces the partial sums in a fixed order
       (deterministic), then scales every tensor by min(1, c/(‖g‖ + 1e-6)) in place — the same
       rule as clip_grad_norm_, so the clipped norm is min(‖g‖, c) and the direction is kept.
       A float64 sum of squares of finite float32 values cannot overflow, so an inf or nan norm
       means a non-finite gradient: the kernel then reports it and leaves the gradients alone.
       """,
       impl=_kernels)
def check_kernel_clip_grad_norm(rng, dtype, impl):
    m = Measure(KERNEL_DTYPE)
    m.note(f"ran on {impl.backend}")
    c = 1.0
    shapes = ((40000,), (7, 5), (3,))
    for label, target in (("‖g‖ = 3c", 3.0), ("‖g‖ = c/2", 0.5)):
        raw = [rng.standard_normal(s) for s in shapes]
        scale = target / math.sqrt(sum(float((r ** 2).sum()) for r in raw))
        grads = [(r * scale).astype(np.float32) for r in raw]
        norm = math.sqrt(math.fsum(float(v) ** 2 for g in grads for v in g.ravel().astype(np.float64)))
        device = [impl.xp.array(g, copy=True) for g in grads]
        got_norm, nonfinite = impl.clip_grad_norm(device, c)
        after = np.concatenate([_host(d).astype(np.float64).ravel() for d in device])
        before = np.concatenate([g.astype(np.float64).ravel() for g in grads])
        m.close(f"{label}: norm vs √(Σg²)", float(got_norm), norm, FORMULA_TOL["float64"] * 100)
        m.close(f"{label}: entries vs g·min(1, c/(‖g‖ + 1e-6))", after, before * min(1.0, c / (norm + 1e-6)))
        m.close(f"{label}: ‖g'‖ vs min(‖g‖, c)", float(np.sqrt((after ** 2).sum())), min(norm, c),
                m.tol + 1e-6)
        m.require(f"{label}: non-finite flag clear", not nonfinite, "flag set for a finite norm")
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes[1:]]
    grads[0][2, 3] = np.inf
    device = [impl.xp.array(g, copy=True) for g in grads]
    got_norm, nonfinite = impl.clip_grad_norm(device, c)
    m.require("inf gradient: flag set, norm inf", nonfinite and not math.isfinite(got_norm),
              f"nonfinite={nonfinite}, norm={got_norm}")
    m.require("inf gradient: gradients untouched",
              all(np.array_equal(_host(d), g) for d, g in zip(device, grads)), "gradients were changed")
    return m
