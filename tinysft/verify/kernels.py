"""The hand-written CUDA kernels (csrc/) against the same formulas as the NumPy code.

With a GPU (CuPy) they run on it; without one they run on the CPU through the
emulator, which compiles the unchanged .cu files with g++ on first use (cached).
If neither works the checks are *skipped*, with the reason: never passed.
Every kernel module in ``tinysft.cuda.ops.OPS`` brings its checks (its ``VERIFY``
list); the implementation hook is a namespace with every launcher of
``tinysft.cuda.LAUNCHERS`` (``softmax_cross_entropy``, ``clip_grad_norm``, ...),
``xp`` (the array module) and ``backend`` (a label).
"""
import shutil
from types import SimpleNamespace

import numpy as np

from ..backend import cuda_available
from ..cuda.ops import OPS
from .registry import Measure, Skip, check

KERNEL_DTYPE = "float32"  # the kernels take float32 only, whatever --dtype says


def _kernels():
    from .. import cuda
    from ..cuda.runtime import get_backend
    if cuda_available():
        import cupy
        return SimpleNamespace(**cuda.LAUNCHERS, xp=cupy, backend="CuPy (GPU)")
    if shutil.which("g++") is None:
        raise Skip("no GPU, and no g++ to build the CPU emulator")
    try:
        be = get_backend("emulator", np.zeros(1, np.float32))
        for op in OPS:
            for kernel in op.KERNELS:
                be.function(op.SOURCE, kernel)
    except Exception as error:  # compiler errors, missing sources, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Skip(f"the CUDA emulator could not build the kernels: {first}") from error
    return SimpleNamespace(**cuda.LAUNCHERS, xp=np, backend="emulator (CPU)")


def _register(spec):
    def run(rng, dtype, impl):
        m = Measure(KERNEL_DTYPE)
        m.note(f"ran on {impl.backend}")
        spec.fn(rng, m, impl)
        return m
    run.__name__ = f"check_{spec.name}"
    check(spec.name, "kernels", formula=spec.formula, method=spec.method, explanation=spec.explanation,
          impl=_kernels)(run)


for _op in OPS:
    for _spec in _op.VERIFY:
        _register(_spec)
