"""Fused softmax cross-entropy (csrc/cross_entropy.cu): launcher, float64 reference, check cases.

For row i of logits x (N, V) with target t_i, label smoothing eps and z-loss weight z:
    lse_i = log sum_j exp x_ij                 q_i = (1 - eps) onehot(t_i) + eps / V
    loss_i = -sum_j q_ij log softmax_ij + z lse_i^2
    dlogits_ij = row_scale (softmax_ij (1 + 2 z lse_i) - q_ij)        zero on rows with t_i == ignore_index

    >>> import numpy as np
    >>> loss, lse, dlogits = softmax_cross_entropy(np.zeros((2, 4), np.float32), np.array([0, -100]))
    >>> loss.astype(float).round(6).tolist(), dlogits.astype(float).round(6).tolist()   # log 4; ignored row 0
    ([1.386294, 0.0], [[-0.75, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
"""
import numpy as np

from ..compare import (ATOL, BenchCase, VerifyCheck, aligned_empty, assert_close, rel_error,
                       run_case, to_backend, to_host)
from ..runtime import check_float32, get_backend

NAME = "ce"
SOURCE = "cross_entropy.cu"
KERNELS = ("cross_entropy_fwd_bwd",)


# ----- launcher
def ce_block_size(vocab: int) -> int:
    """Threads per row: about 16 logits per thread, a power of two in [32, 1024]."""
    return int(min(1024, max(32, 1 << max(0, (-(-vocab // 16) - 1).bit_length()))))


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, row_scale=None,
                          in_place=False, backend="auto", block_size=None):
    """Fused softmax cross-entropy forward and backward, one block per row.

    logits (N, V) float32, targets (N,) integers. Returns float32 (loss_rows (N,), lse (N,), dlogits (N, V)),
    the formulas of this module. row_scale defaults to 1 / number of non-ignored rows (mean reduction).
    in_place writes dlogits over logits. A target outside [0, V) that is not ignore_index raises IndexError.
    """
    be = get_backend(backend, logits)
    xp = be.xp
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must have shape (N, V), got shape {getattr(logits, 'shape', None)}")
    check_float32(be, logits, "logits")
    n, v = logits.shape
    if not isinstance(targets, xp.ndarray) or targets.shape != (n,):
        raise ValueError(f"targets must be a {xp.__name__} array of shape ({n},) for logits {logits.shape}, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if v == 0:
        raise ValueError("logits must have V >= 1 columns")
    targets = xp.ascontiguousarray(targets, dtype=np.int64)
    if row_scale is None:
        row_scale = 1.0 / max(int((targets != ignore_index).sum()), 1)
    loss = xp.empty(n, dtype=np.float32)
    lse = xp.empty(n, dtype=np.float32)
    dlogits = logits if in_place else xp.empty_like(logits)
    if n == 0:
        return loss, lse, dlogits
    error = xp.zeros(1, dtype=np.int32)
    kernel = be.function(SOURCE, "cross_entropy_fwd_bwd")
    kernel((n,), (block_size or ce_block_size(v),),
           (logits, dlogits, targets, loss, lse, error, np.int64(v), np.int64(ignore_index),
            np.float32(label_smoothing), np.float32(z_loss), np.float32(row_scale)))
    if int(error[0]):
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= v))]
        raise IndexError(f"target {int(bad[0])} is out of range for {v} classes "
                         f"(ignore_index={ignore_index}); {int(bad.size)} bad targets")
    return loss, lse, dlogits


LAUNCHERS = {"softmax_cross_entropy": softmax_cross_entropy}


# ----- float64 reference
def reference(logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, row_scale=None):
    """(loss [N], lse [N], dlogits [N, V]) in float64 from the formulas above, PyTorch semantics.

    Plain formulas, no tricks beyond the max shift; row_scale defaults to 1 / #valid rows.
    """
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    n, v = x.shape
    valid = t != ignore_index
    if row_scale is None:
        row_scale = 1.0 / max(int(valid.sum()), 1)
    m = x.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        p = e / s
        tt = np.where(valid, t, 0)
        x_t = x[np.arange(n), tt]
        loss = (1 - label_smoothing) * (lse - x_t)
        if label_smoothing:
            loss = loss + label_smoothing * (lse - x.mean(axis=1))
        if z_loss:
            loss = loss + z_loss * lse**2
        q = np.full((n, v), label_smoothing / v)
        q[np.arange(n), tt] += 1 - label_smoothing
        grad = (p * (1 + 2 * z_loss * lse[:, None]) - q) * row_scale
    loss = np.where(valid, loss, 0.0)
    grad[~valid] = 0.0
    return loss, lse, grad


# ----- check cases
# Tolerances: loss, lse |a - r| <= 1e-6 |r| + 2^-22;
#             dlogits   |g - r| <= 1e-6 |r| + 2^-22 row_scale (1 + 2 z |lse|)   (2 ulp of the largest term, 1)
def make_input(n, v, *, seed=0, scale=3.0, offset=0, neg_inf=0.0, ignore=0.0, ignore_index=-100):
    """Random logits (N, V) whose base lies `offset` floats past 64-byte alignment, and targets."""
    rng = np.random.default_rng(seed)
    x = aligned_empty(n * v, offset).reshape(n, v)
    x[...] = rng.standard_normal((n, v)) * scale
    t = rng.integers(0, v, n)
    if neg_inf:
        x[rng.random((n, v)) < neg_inf] = -np.inf
        x[np.arange(n), t] = np.where(np.isinf(x[np.arange(n), t]), 0.0, x[np.arange(n), t])
    if ignore:
        t[rng.random(n) < ignore] = ignore_index
    return x, t


# name -> (input kwargs, launcher kwargs, block size or None)
CASES = {
    "basic": (dict(n=8, v=1000), {}, 256),
    "huge_logits_1e4": (dict(n=6, v=300, scale=1e4), {}, 128),
    "neg_inf_logits": (dict(n=6, v=200, neg_inf=0.7), {}, 64),
    "ignored_rows": (dict(n=12, v=100, ignore=0.4), {}, 64),
    "v_not_multiple_of_block": (dict(n=5, v=37), {}, 64),
    "misaligned_rows": (dict(n=7, v=1001, offset=1), {}, 128),
    "misaligned_base_offset_3": (dict(n=3, v=64, offset=3), {}, 32),
    "n1": (dict(n=1, v=517), {}, 256),
    "v1": (dict(n=4, v=1), {}, 32),
    "label_smoothing": (dict(n=6, v=333, offset=2), dict(label_smoothing=0.1), 128),
    "z_loss": (dict(n=6, v=257), dict(z_loss=1e-3, label_smoothing=0.05), 64),
    "ignore_index_0_row_scale": (dict(n=9, v=50, ignore=0.3, ignore_index=0), dict(ignore_index=0, row_scale=0.5), 32),
    "in_place": (dict(n=5, v=301, offset=1), dict(in_place=True, label_smoothing=0.2), 128),
    "block_1024_v4099": (dict(n=2, v=4099), {}, 1024),
    "v50257": (dict(n=2, v=50257, offset=1), {}, None),
}


def compare_outputs(name, out, ref, kw):
    """Raises CheckFailure unless (loss, lse, dlogits) meet the tolerances against the reference."""
    loss, lse, grad = out
    ref_loss, ref_lse, ref_grad = ref
    assert_close(name, "loss", loss, ref_loss, ATOL)
    assert_close(name, "lse", lse, ref_lse, ATOL)
    scale = kw["row_scale"] * (1 + 2 * kw.get("z_loss", 0.0) * np.abs(ref_lse))[:, None]
    assert_close(name, "dlogits", grad, ref_grad, ATOL * scale)


def check(name, backend, schedules):
    """Runs case `name`; returns max relative errors {loss, lse, dlogits} (entries with |ref| > 1e-3 scale)."""
    input_kw, kw, block = CASES[name]
    x, t = make_input(**input_kw)
    ref_kw = {k: v for k, v in kw.items() if k != "in_place"}
    ref = reference(x, t, **ref_kw)
    n_valid = int((t != kw.get("ignore_index", -100)).sum())
    ref_kw.setdefault("row_scale", 1.0 / max(n_valid, 1))

    def launch(be):
        xi = x
        if kw.get("in_place"):  # a fresh copy with the same misalignment
            xi = aligned_empty(x.size, input_kw.get("offset", 0)).reshape(x.shape)
            xi[...] = x
        return softmax_cross_entropy(to_backend(be, xi), to_backend(be, t), backend=be, block_size=block, **kw)

    def compare(out):
        compare_outputs(name, out, ref, ref_kw)
        return {"loss": rel_error(out[0], ref[0], 1e-3), "lse": rel_error(out[1], ref[1], 1e-3),
                "dlogits": rel_error(out[2], ref[2], 1e-3 * ref_kw["row_scale"])}

    return run_case(name, backend, schedules, launch, compare)


# ----- tinysft verify
def _verify(rng, m, impl):
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
        want_loss, want_lse, want_grad = reference(logits, targets, **kw)
        loss, lse, grad = impl.softmax_cross_entropy(impl.xp.asarray(logits), impl.xp.asarray(targets), **kw)
        m.close(f"{label}: loss rows", to_host(loss), want_loss)
        m.close(f"{label}: lse", to_host(lse), want_lse)
        m.close(f"{label}: dlogits", to_host(grad), want_grad)
        if label == "ignore_index rows":
            valid = int((targets != -100).sum())
            m.close(f"{label}: mean loss Σ loss_i/|V| vs −(1/N)ΣΣ y log p",
                    to_host(loss).astype(np.float64).sum() / valid, want_loss.sum() / valid)


VERIFY = [VerifyCheck(
    "kernel_cross_entropy",
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
    fn=_verify)]


# ----- timing on a GPU (benchmarks/gpu_kernels.py)
def bench_cases(xp, shapes=((8192, 50304), (4096, 49152))):
    """Fused forward+backward at LM-head shapes; the least traffic is reading the logits and writing dlogits."""
    cases = []
    for n, v in shapes:
        rng = xp.random.default_rng(0)
        x = rng.standard_normal((n, v), dtype=np.float32) * 3
        t = rng.integers(0, v, n)
        cases.append(BenchCase(f"cross-entropy fwd+bwd {n}x{v}", 2 * x.nbytes, {"logits": x, "targets": t},
                               lambda x=x, t=t: softmax_cross_entropy(x, t)))
    return cases


