"""What every kernel's check cases share: aligned inputs, the tolerance test, host/device copies, and the
run of one case under every emulator schedule.

Tolerances (float32 kernels against float64 references) are `|got - ref| <= TOL |ref| + atol`, with the
`atol` each kernel module states for its outputs.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

ALL_SCHEDULES = (("forward", 0), ("reverse", 0), ("greedy", 0), ("greedy_reverse", 0), ("random", 1), ("random", 2))
QUICK_SCHEDULES = (("forward", 0), ("reverse", 0), ("greedy_reverse", 0), ("random", 1))
TOL = 1e-6
ATOL = 2.0**-22


class CheckFailure(AssertionError):
    pass


@dataclass(frozen=True)
class VerifyCheck:
    """One entry of `tinysft verify` (family "kernels"): fn(rng, measure, impl) records its comparisons."""
    name: str
    formula: str
    method: str
    explanation: str
    fn: Callable


@dataclass(frozen=True)
class BenchCase:
    """One timing of benchmarks/gpu_kernels.py: `run()` launches the kernel on `inputs`; `nbytes` is the
    least traffic the operation needs (for GB/s)."""
    label: str
    nbytes: int
    inputs: dict
    run: Callable


def aligned_empty(n, offset=0):
    """float32 array of n elements starting `offset` floats past a 64-byte boundary."""
    buf = np.empty(n + 16 + offset, dtype=np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    return buf[start:start + n]


def assert_close(name, what, got, ref, atol):
    """Raises CheckFailure naming the first entry with |got - ref| > TOL |ref| + atol (NaN matches NaN)."""
    got = np.asarray(got, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(got - ref) <= TOL * np.abs(ref) + atol)
    bad &= ~((got == ref) | (np.isnan(got) & np.isnan(ref)))  # equal infinities / NaN where the reference has NaN
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        raise CheckFailure(f"{name}: {what} differs at {tuple(int(k) for k in i)}: got {got[i]!r}, "
                           f"reference {ref[i]!r} ({int(bad.sum())} of {bad.size} entries out of tolerance)")


def rel_error(got, ref, floor):
    """max |got - ref| / |ref| over the finite reference entries with |ref| > floor."""
    got = np.asarray(got, dtype=np.float64)
    mask = np.isfinite(ref) & (np.abs(ref) > floor)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(got - ref)[mask] / np.abs(ref)[mask], initial=0.0))


def backend_name(backend):
    return getattr(backend, "name", backend)


def to_backend(backend, a):
    """`a` on the backend's device; a CuPy copy keeps the 16-byte phase of the NumPy array."""
    if backend_name(backend) != "cupy":
        return a
    import cupy
    offset = (a.ctypes.data % 16) // a.itemsize if a.dtype == np.float32 else 0
    out = cupy.empty(a.size + offset, dtype=a.dtype)[offset:].reshape(a.shape)
    out.set(np.ascontiguousarray(a))
    return out


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def run_case(name, backend, schedules, launch, compare):
    """Runs one case: `launch(backend)` (fresh inputs each call) -> outputs; `compare(host outputs)` -> errors.

    On the emulator `launch` runs once per schedule and every run must give the bits of the first; on a
    GPU it runs once. Returns compare's dict of errors; raises CheckFailure.
    """
    if backend_name(backend) == "emulator" and schedules:
        from tinysft.cuda.emulator import schedule
        runs = [(f"{s}/{seed}", schedule(s, seed)) for s, seed in schedules]
    else:
        runs = [("default", contextlib.nullcontext())]
    first = errors = None
    for label, ctx in runs:
        with ctx:
            out = [np.asarray(to_host(o)) for o in launch(backend)]
        if first is None:
            first, first_label = out, label
            errors = compare(out)
        elif any(a.tobytes() != b.tobytes() for a, b in zip(out, first)):
            raise CheckFailure(f"{name}: outputs under schedule {label} differ from schedule {first_label} "
                               f"(not bit-identical)")
    return errors
