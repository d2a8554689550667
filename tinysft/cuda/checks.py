"""Correctness cases for the kernels, shared by the tests, the planted-bug runs and benchmarks/gpu_kernels.py.

Each case runs through the launchers in tinysft.cuda.kernels on a given backend and is compared with the
float64 references in tinysft.cuda.reference. On the emulator every case also runs under several thread
schedules, which must give bit-identical outputs.

Tolerances (float32 kernels against float64 references):
    loss, lse:  |a - r| <= 1e-6 |r| + 2^-22
    dlogits:    |g - r| <= 1e-6 |r| + 2^-22 row_scale (1 + 2 z |lse|)   (2 ulp of the largest term, 1)
    clip norm:  |n - r| <= 1e-6 r;  clipped values: |a - r| <= 1e-6 |r| + 2^-23 |x| (float32 product rounding)

    python -m tinysft.cuda.checks [--csrc DIR] [--sanitize address|thread] [--only ce|clip] [--cases a,b]
                                  [--quick] [--fail-fast]
"""
import argparse
import sys

import numpy as np

from tinysft.cuda import kernels
from tinysft.cuda.reference import clip_grad_norm_reference, cross_entropy_reference

ALL_SCHEDULES = (("forward", 0), ("reverse", 0), ("greedy", 0), ("greedy_reverse", 0), ("random", 1), ("random", 2))
QUICK_SCHEDULES = (("forward", 0), ("reverse", 0), ("greedy_reverse", 0), ("random", 1))
TOL = 1e-6
ATOL = 2.0**-22


class CheckFailure(AssertionError):
    pass


def aligned_empty(n, offset=0):
    """float32 array of n elements starting `offset` floats past a 64-byte boundary."""
    buf = np.empty(n + 16 + offset, dtype=np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    return buf[start:start + n]


def ce_input(n, v, *, seed=0, scale=3.0, offset=0, neg_inf=0.0, ignore=0.0, ignore_index=-100):
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
CE_CASES = {
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


def _close(name, what, got, ref, atol):
    got = np.asarray(got, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(got - ref) <= TOL * np.abs(ref) + atol)
    bad &= ~((got == ref) | (np.isnan(got) & np.isnan(ref)))  # equal infinities / NaN where the reference has NaN
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        raise CheckFailure(f"{name}: {what} differs at {tuple(int(k) for k in i)}: got {got[i]!r}, "
                           f"reference {ref[i]!r} ({int(bad.sum())} of {bad.size} entries out of tolerance)")


def _rel(got, ref, floor):
    got = np.asarray(got, dtype=np.float64)
    mask = np.isfinite(ref) & (np.abs(ref) > floor)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(got - ref)[mask] / np.abs(ref)[mask], initial=0.0))


def _same_bits(name, schedule, outputs, first):
    for what, a, b in zip(("loss", "lse", "dlogits"), outputs, first):
        if a.tobytes() != b.tobytes():
            raise CheckFailure(f"{name}: {what} under schedule {schedule} differs from schedule "
                               f"{ALL_SCHEDULES[0]} (not bit-identical)")


def _runs(backend, schedules):
    """(label, context manager) per run: every schedule on the emulator, one run elsewhere."""
    if getattr(backend, "name", backend) != "emulator" or not schedules:
        import contextlib
        return [("default", contextlib.nullcontext())]
    from tinysft.cuda.emulator import schedule
    return [(f"{s}/{seed}", schedule(s, seed)) for s, seed in schedules]


def to_backend(backend, a):
    """`a` on the backend's device; a CuPy copy keeps the 16-byte phase of the NumPy array."""
    if getattr(backend, "name", backend) != "cupy":
        return a
    import cupy
    offset = (a.ctypes.data % 16) // a.itemsize if a.dtype == np.float32 else 0
    out = cupy.empty(a.size + offset, dtype=a.dtype)[offset:].reshape(a.shape)
    out.set(np.ascontiguousarray(a))
    return out


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def check_ce(name, backend="emulator", schedules=ALL_SCHEDULES):
    """Runs CE case `name`; returns max relative errors {loss, lse, dlogits} (entries with |ref| > 1e-3 scale)."""
    input_kw, kw, block = CE_CASES[name]
    x, t = ce_input(**input_kw)
    ref_loss, ref_lse, ref_grad = cross_entropy_reference(x, t, **{k: v for k, v in kw.items() if k != "in_place"})
    n_valid = int((t != kw.get("ignore_index", -100)).sum())
    row_scale = kw.get("row_scale", 1.0 / max(n_valid, 1))
    first = None
    for label, ctx in _runs(backend, schedules):
        xi = x
        if kw.get("in_place"):  # a fresh copy with the same misalignment
            xi = aligned_empty(x.size, input_kw.get("offset", 0)).reshape(x.shape)
            xi[...] = x
        xb = to_backend(backend, xi)
        with ctx:
            out = kernels.softmax_cross_entropy(xb, to_backend(backend, t), backend=backend, block_size=block, **kw)
        out = tuple(to_host(o) for o in out)
        if first is None:
            first = out
            loss, lse, grad = out
            _close(name, "loss", loss, ref_loss, ATOL)
            _close(name, "lse", lse, ref_lse, ATOL)
            scale = row_scale * (1 + 2 * kw.get("z_loss", 0.0) * np.abs(ref_lse))[:, None]
            _close(name, "dlogits", grad, ref_grad, ATOL * scale)
        else:
            _same_bits(name, label, out, first)
    loss, lse, grad = first
    return {"loss": _rel(loss, ref_loss, 1e-3), "lse": _rel(lse, ref_lse, 1e-3),
            "dlogits": _rel(grad, ref_grad, 1e-3 * row_scale)}


def clip_input(sizes, *, seed=0, offsets=None, scale=1.0, special=None):
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
CLIP_CASES = {
    "mixed_sizes": (dict(sizes=[(3, 5), (16384 * 2 + 5,), (7,), (1,), (64, 33)]), 1.0),
    "misaligned_views": (dict(sizes=[(1001,), (16387,), (5, 3)], offsets=[1, 2, 3]), 0.5),
    "no_clip_needed": (dict(sizes=[(100,), (37,)], scale=1e-3), 10.0),
    "empty_tensor": (dict(sizes=[(0,), (40000,), (2,)]), 1.0),
    "huge_values": (dict(sizes=[(300,), (17,)], scale=1e30), 1.0),
    "inf_gradient": (dict(sizes=[(300,), (17,)], special=np.inf), 1.0),
    "nan_gradient": (dict(sizes=[(30,), (16390,)], special=np.nan), 1.0),
}


def check_clip(name, backend="emulator", schedules=ALL_SCHEDULES):
    """Runs clip case `name` (norm and value clipping); returns max relative errors {norm, scaled}."""
    input_kw, max_norm = CLIP_CASES[name]
    ref_norm, ref_scaled = clip_grad_norm_reference(clip_input(**input_kw), max_norm)
    first = None
    errors = {}
    for label, ctx in _runs(backend, schedules):
        grads = [to_backend(backend, g) for g in clip_input(**input_kw)]
        with ctx:
            norm, nonfinite = kernels.clip_grad_norm(grads, max_norm, backend=backend)
        host = [to_host(g) for g in grads]
        if first is None:
            first = (norm, host)
            if nonfinite != (not np.isfinite(ref_norm)):
                raise CheckFailure(f"{name}: nonfinite flag {nonfinite}, reference norm {ref_norm}")
            if not (abs(norm - ref_norm) <= TOL * ref_norm or norm == ref_norm or np.isnan(ref_norm) and np.isnan(norm)):
                raise CheckFailure(f"{name}: norm {norm!r}, reference {ref_norm!r}")
            for i, (g, r, x) in enumerate(zip(host, ref_scaled, clip_input(**input_kw))):
                _close(name, f"clipped grads[{i}]", g, r, 2.0**-23 * np.abs(x.astype(np.float64)))
            errors = {"norm": abs(norm - ref_norm) / ref_norm if np.isfinite(ref_norm) and ref_norm else 0.0,
                      "scaled": max(_rel(g, r, 1e-30) for g, r in zip(host, ref_scaled))}
        elif np.float64(norm).tobytes() != np.float64(first[0]).tobytes() or any(a.tobytes() != b.tobytes() for a, b in zip(host, first[1])):
            raise CheckFailure(f"{name}: clip_grad_norm under schedule {label} is not bit-identical")
    # clip by value on the same tensors: exact (a comparison and a select)
    grads = [to_backend(backend, g) for g in clip_input(**input_kw)]
    kernels.clip_grad_value(grads, 0.5, backend=backend)
    for i, (g, x) in enumerate(zip(grads, clip_input(**input_kw))):
        expect = np.where(np.isnan(x), x, np.clip(x, -0.5, 0.5))
        if to_host(g).tobytes() != expect.tobytes():
            raise CheckFailure(f"{name}: clip_grad_value differs on grads[{i}]")
    return errors


def run_all(backend="emulator", *, only=None, cases=None, quick=False, fail_fast=False, out=sys.stdout):
    """Runs every case (or those named in `cases`); prints one line each; returns the number of failures."""
    schedules = QUICK_SCHEDULES if quick else ALL_SCHEDULES
    jobs = []
    if only in (None, "ce"):
        jobs += [("ce", n, check_ce) for n in CE_CASES]
    if only in (None, "clip"):
        jobs += [("clip", n, check_clip) for n in CLIP_CASES]
    if cases:
        jobs = [j for j in jobs if j[1] in cases]
    failures = 0
    for kind, name, fn in jobs:
        try:
            errors = fn(name, backend, schedules)
            print(f"PASS {kind}/{name} " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()), file=out, flush=True)
        except Exception as e:  # report every kind of failure: wrong values, emulator errors, argument errors
            failures += 1
            print(f"FAIL {kind}/{name}: {type(e).__name__}: {e}", file=out, flush=True)
            if fail_fast:
                break
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csrc", help="kernel source directory (default: the package's)")
    p.add_argument("--sanitize", choices=["address", "thread"])
    p.add_argument("--only", choices=["ce", "clip"])
    p.add_argument("--cases", help="comma-separated case names")
    p.add_argument("--quick", action="store_true", help="fewer schedules")
    p.add_argument("--fail-fast", action="store_true")
    args = p.parse_args(argv)
    backend = kernels.EmulatorBackend(args.csrc, args.sanitize)
    cases = args.cases.split(",") if args.cases else None
    return 1 if run_all(backend, only=args.only, cases=cases, quick=args.quick, fail_fast=args.fail_fast) else 0


if __name__ == "__main__":
    sys.exit(main())
