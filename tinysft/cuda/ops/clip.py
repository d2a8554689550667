"""Gradient clipping over many float32 tensors (csrc/clip.cu): launchers, float64 reference, check cases.

    norm = sqrt(sum over every tensor of sum x^2)         (float64, deterministic)
    clip_grad_norm:   x *= min(1, max_norm / (norm + 1e-6)), unless norm is inf or NaN
    clip_grad_value:  x = clamp(x, -c, c), NaN stays NaN

    >>> import numpy as np
    >>> grads = [np.full(3, 3.0, np.float32), np.full(4, 2.0, np.float32)]   # norm sqrt(27 + 16)
    >>> norm, nonfinite = clip_grad_norm(grads, 1.0)
    >>> round(norm, 4), nonfinite, round(float(np.sqrt(sum((g.astype(float) ** 2).sum() for g in grads))), 4)
    (6.5574, False, 1.0)
"""
import math

import numpy as np

from ..compare import (BenchCase, CheckFailure, VerifyCheck, aligned_empty, assert_close, rel_error, run_case,
                       to_backend, to_host)
from ..runtime import check_float32, get_backend

NAME = "clip"
SOURCE = "clip.cu"
KERNELS = ("clip_sumsq", "clip_finalize", "clip_scale", "clip_value")
CHUNK = 16384  # elements per block in the multi-tensor kernels (a multiple of 4)
BLOCK = 256


# ----- launchers
def _chunk_table(be, grads, what):
    """Device tables for the multi-tensor kernels: (ptrs, sizes, chunk_tensor, chunk_start), #chunks."""
    for i, g in enumerate(grads):
        check_float32(be, g, f"{what}[{i}]")
    sizes = np.array([g.size for g in grads], dtype=np.int64)
    counts = -(-sizes // CHUNK)
    chunk_tensor = np.repeat(np.arange(len(grads), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    chunk_start = (np.arange(chunk_tensor.size, dtype=np.int64) - first) * CHUNK
    ptrs = np.array([be.address(g) for g in grads], dtype=np.uint64)
    xp = be.xp
    return (xp.asarray(ptrs), xp.asarray(sizes), xp.asarray(chunk_tensor), xp.asarray(chunk_start)), chunk_tensor.size


def clip_grad_norm(grads, max_norm, *, backend="auto"):
    """Global L2-norm clipping in place, like torch.nn.utils.clip_grad_norm_.

    Returns (norm as a Python float, nonfinite). When the norm is inf or NaN the gradients are left
    untouched and nonfinite is True.
    """
    grads = list(grads)
    if not grads:
        return 0.0, False
    be = get_backend(backend, grads[0])
    xp = be.xp
    tables, num_chunks = _chunk_table(be, grads, "grads")
    if num_chunks == 0:
        return 0.0, False
    partial = xp.empty(num_chunks, dtype=np.float64)
    norm = xp.empty(1, dtype=np.float64)
    scale = xp.empty(1, dtype=np.float32)
    nonfinite = xp.zeros(1, dtype=np.int32)
    chunk = np.int64(CHUNK)
    be.function(SOURCE, "clip_sumsq")((num_chunks,), (BLOCK,), (*tables, chunk, partial))
    be.function(SOURCE, "clip_finalize")((1,), (BLOCK,), (partial, np.int64(num_chunks), float(max_norm),
                                                         norm, scale, nonfinite))
    be.function(SOURCE, "clip_scale")((num_chunks,), (BLOCK,), (*tables, chunk, scale))
    return float(norm[0]), bool(int(nonfinite[0]))


def clip_grad_value(grads, clip_value, *, backend="auto"):
    """Clamps every gradient to [-clip_value, clip_value] in place (NaN stays NaN), like clip_grad_value_."""
    grads = list(grads)
    if not grads:
        return
    be = get_backend(backend, grads[0])
    tables, num_chunks = _chunk_table(be, grads, "grads")
    if num_chunks:
        be.function(SOURCE, "clip_value")((num_chunks,), (BLOCK,),
                                          (*tables, np.int64(CHUNK), np.float32(abs(clip_value))))


LAUNCHERS = {"clip_grad_norm": clip_grad_norm, "clip_grad_value": clip_grad_value}


# ----- float64 reference
def reference(grads, max_norm):
    """(total_norm, clipped grads) in float64: norm = sqrt(sum of squares), scale = min(1, max_norm / (norm + 1e-6))."""
    flat = [np.asarray(g, dtype=np.float64).ravel() for g in grads]
    norm = float(np.sqrt(sum(float(np.dot(f, f)) for f in flat)))
    scale = min(1.0, max_norm / (norm + 1e-6)) if np.isfinite(norm) else 1.0
    return norm, [np.asarray(g, dtype=np.float64) * scale for g in grads]


# ----- check cases
# Tolerances: norm |n - r| <= 1e-6 r;  clipped values |a - r| <= 1e-6 |r| + 2^-23 |x| (float32 product rounding);
# clip by value: exact (a comparison and a select).
def make_input(sizes, *, seed=0, offsets=None, scale=1.0, special=None):
    """Random float32 tensors of the given shapes, tensor i `offsets[i]` floats past 64-byte alignment."""
    rng = np.random.default_rng(seed)
    grads = []
    for i, size in enumerate(sizes):
        g = aligned_empty(int(np.prod(size)), (offsets or [0] * len(sizes))[i]).reshape(size)
        g[...] = rng.standard_normal(size) * scale
        grads.append(g)
    if special is not None:
        grads[-1].ravel()[-1] = special
    return grads


# name -> (input kwargs, max_norm); sizes mix tiny, odd and multi-chunk tensors
CASES = {
    "mixed_sizes": (dict(sizes=[(3, 5), (16384 * 2 + 5,), (7,), (1,), (64, 33)]), 1.0),
    "misaligned_views": (dict(sizes=[(1001,), (16387,), (5, 3)], offsets=[1, 2, 3]), 0.5),
    "no_clip_needed": (dict(sizes=[(100,), (37,)], scale=1e-3), 10.0),
    "empty_tensor": (dict(sizes=[(0,), (40000,), (2,)]), 1.0),
    "huge_values": (dict(sizes=[(300,), (17,)], scale=1e30), 1.0),
    "inf_gradient": (dict(sizes=[(300,), (17,)], special=np.inf), 1.0),
    "nan_gradient": (dict(sizes=[(30,), (16390,)], special=np.nan), 1.0),
}
VALUE_CLIP = 0.5


def check(name, backend, schedules):
    """Runs case `name` (norm and value clipping); returns max relative errors {norm, scaled}."""
    input_kw, max_norm = CASES[name]
    original = make_input(**input_kw)
    ref_norm, ref_scaled = reference(original, max_norm)
    k = len(original)

    def launch(be):  # outputs: norm, nonfinite, the norm-clipped tensors, the value-clipped tensors
        by_norm = [to_backend(be, g) for g in make_input(**input_kw)]
        norm, nonfinite = clip_grad_norm(by_norm, max_norm, backend=be)
        by_value = [to_backend(be, g) for g in make_input(**input_kw)]
        clip_grad_value(by_value, VALUE_CLIP, backend=be)
        return [norm, nonfinite, *by_norm, *by_value]

    def compare(out):
        norm, nonfinite, by_norm, by_value = float(out[0]), bool(out[1]), out[2:2 + k], out[2 + k:]
        if nonfinite != (not np.isfinite(ref_norm)):
            raise CheckFailure(f"{name}: nonfinite flag {nonfinite}, reference norm {ref_norm}")
        if not (abs(norm - ref_norm) <= 1e-6 * ref_norm or norm == ref_norm or np.isnan(ref_norm) and np.isnan(norm)):
            raise CheckFailure(f"{name}: norm {norm!r}, reference {ref_norm!r}")
        for i, (g, r, x) in enumerate(zip(by_norm, ref_scaled, original)):
            assert_close(name, f"clipped grads[{i}]", g, r, 2.0**-23 * np.abs(x.astype(np.float64)))
        for i, (g, x) in enumerate(zip(by_value, original)):
            expect = np.where(np.isnan(x), x, np.clip(x, -VALUE_CLIP, VALUE_CLIP))
            if g.tobytes() != expect.tobytes():
                raise CheckFailure(f"{name}: clip_grad_value differs on grads[{i}]")
        return {"norm": abs(norm - ref_norm) / ref_norm if np.isfinite(ref_norm) and ref_norm else 0.0,
                "scaled": max(rel_error(g, r, 1e-30) for g, r in zip(by_norm, ref_scaled))}

    return run_case(name, backend, schedules, launch, compare)


# ----- tinysft verify
def _verify(rng, m, impl):
    c = 1.0
    shapes = ((40000,), (7, 5), (3,))
    for label, target in (("‖g‖ = 3c", 3.0), ("‖g‖ = c/2", 0.5)):
        raw = [rng.standard_normal(s) for s in shapes]
        scale = target / math.sqrt(sum(float((r ** 2).sum()) for r in raw))
        grads = [(r * scale).astype(np.float32) for r in raw]
        norm = math.sqrt(math.fsum(float(v) ** 2 for g in grads for v in g.ravel().astype(np.float64)))
        device = [impl.xp.array(g, copy=True) for g in grads]
        got_norm, nonfinite = impl.clip_grad_norm(device, c)
        after = np.concatenate([to_host(d).astype(np.float64).ravel() for d in device])
        before = np.concatenate([g.astype(np.float64).ravel() for g in grads])
        m.close(f"{label}: norm vs √(Σg²)", float(got_norm), norm, 1e-8)
        m.close(f"{label}: entries vs g·min(1, c/(‖g‖ + 1e-6))", after, before * min(1.0, c / (norm + 1e-6)))
        m.close(f"{label}: ‖g'‖ vs min(‖g‖, c)", float(np.sqrt((after ** 2).sum())), min(norm, c), m.tol + 1e-6)
        m.require(f"{label}: non-finite flag clear", not nonfinite, "flag set for a finite norm")
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes[1:]]
    grads[0][2, 3] = np.inf
    device = [impl.xp.array(g, copy=True) for g in grads]
    got_norm, nonfinite = impl.clip_grad_norm(device, c)
    m.require("inf gradient: flag set, norm inf", nonfinite and not math.isfinite(got_norm),
              f"nonfinite={nonfinite}, norm={got_norm}")
    m.require("inf gradient: gradients untouched",
              all(np.array_equal(to_host(d), g) for d, g in zip(device, grads)), "gradients were changed")


VERIFY = [VerifyCheck(
    "kernel_clip_grad_norm",
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
    fn=_verify)]


# ----- timing on a GPU (benchmarks/gpu_kernels.py)
def minilm_shapes(vocab=30522, hidden=384, layers=6, ffn=1536, positions=512):
    """Parameter shapes of a MiniLM-L6 (BERT) encoder without pooler: 22.6M floats."""
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,)] * 4  # two LayerNorms
    return shapes


def smollm2_135m_shapes(vocab=49152, hidden=576, layers=30, ffn=1536, kv=192):
    """Parameter shapes of SmolLM2-135M (Llama: tied embedding, GQA with 3 KV heads of 64): 134.5M floats."""
    shapes = [(vocab, hidden), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
        shapes += [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return shapes


def bench_cases(xp):
    """clip_grad_norm at two model sizes; the least traffic is one read for the norm, one read+write to scale."""
    cases = []
    for label, shapes in (("MiniLM-L6", minilm_shapes()), ("SmolLM2-135M", smollm2_135m_shapes())):
        rng = xp.random.default_rng(0)
        grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        total = sum(g.size for g in grads)
        cases.append(BenchCase(f"clip_grad_norm {label} ({len(grads)} tensors, {total / 1e6:.1f}M)", 3 * 4 * total,
                               {"grads": grads, "max_norm": 1e-3},
                               lambda grads=grads: clip_grad_norm(grads, 1e-3)))
    return cases
