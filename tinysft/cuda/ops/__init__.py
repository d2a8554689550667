"""The kernels of csrc/, one module per .cu file, and the one table of them (`OPS`).

The checks (`python -m tinysft.cuda.checks`), `tinysft verify`, benchmarks/gpu_kernels.py and the tests
iterate over `OPS`; each module holds everything about its kernel:

    NAME         short name: `--only NAME`, case ids `NAME/case`
    SOURCE       the .cu file in csrc/;  KERNELS  the extern "C" kernels in it
    LAUNCHERS    {name: launcher} exported by tinysft.cuda (NumPy arrays -> emulator, CuPy arrays -> GPU)
    reference    the float64 NumPy reference
    CASES        {case: spec};  check(case, backend, schedules) -> {what: max relative error}
    VERIFY       [compare.VerifyCheck]: its entries in `tinysft verify`
    bench_cases  bench_cases(xp) -> [compare.BenchCase]: the GPU timings

Adding a kernel: csrc/<op>.cu, tinysft/cuda/ops/<op>.py, one line here (see csrc/README.md).
"""
from . import clip, cross_entropy

OPS = (cross_entropy, clip)

BY_NAME = {op.NAME: op for op in OPS}
