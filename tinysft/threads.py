"""Splitting large NumPy work over the CPU's cores, in row blocks.

NumPy releases the GIL inside its ufuncs and reductions, so k threads that run the same
NumPy calls on k disjoint blocks of rows of an array keep k cores busy. ``map_rows(fn, n)``
cuts the row range ``[0, n)`` into at most ``num_threads()`` contiguous blocks, runs
``fn(start, stop)`` on each (the first block in the calling thread, the others in a
small persistent pool) and returns the results in block order:

    def block(start, stop):                     # rows [start, stop) of x, in place
        np.exp(x[start:stop], out=x[start:stop])
    map_rows(block, len(x), row_cost=x.shape[1])

Work of fewer than ``MIN_PARALLEL`` elements (``n · row_cost``) runs in one call on the
calling thread: below that, waking a thread costs more than it saves.

Reproducibility: the blocks depend only on ``n`` and the thread count, and the results
come back in block order, so a reduction that adds the per-block results in that order
gives the same bits in every run with the same thread count.

The thread count is ``TINYSFT_NUM_THREADS``, else ``OMP_NUM_THREADS`` (the variable that
also sets OpenBLAS's threads), else the cores this process may run on; ``set_num_threads``
changes it at run time.

BLAS: ``matmul(a, b)`` splits a product's rows (or its batch) the same way, each block one BLAS
call, and while any tinysft work runs on several threads the BLAS runs single-threaded
(OpenBLAS's ``openblas_set_num_threads_local``; the previous setting comes back when the last such
work ends). So OpenBLAS's own worker threads are never woken by the engine: after each call they
spin for a while, and on a 2-core machine that spinning took a core from the elementwise blocks
that follow (the attention of a MiniLM forward ran 1.8x slower beside it). Without that OpenBLAS
call (another BLAS, an OpenBLAS before 0.3.27) ``matmul`` is plain ``a @ b``, threaded by the BLAS.
A product's bits depend on its blocks, so on the thread count, as OpenBLAS's own threading does.
"""
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

__all__ = ["MIN_PARALLEL", "MIN_PARALLEL_GEMM", "num_threads", "set_num_threads", "row_blocks", "map_rows",
           "split_rows", "single_threaded_blas", "matmul"]

MIN_PARALLEL = 1 << 16
"""Elements below which ``map_rows`` runs on the calling thread alone (~64K floats: tens of µs of work)."""
MIN_PARALLEL_GEMM = 1 << 22
"""Multiply-adds (N·K·M) below which ``matmul`` is one BLAS call (~4M: tens of µs of work)."""


def _default_threads() -> int:
    for var in ("TINYSFT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"{var} must be a whole number of threads, got {value!r}") from None
            if count < 1:
                raise ValueError(f"{var} must be at least 1, got {count}")
            return count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _find_blas_threads_local():
    """OpenBLAS's ``openblas_set_num_threads_local(n) -> previous`` from the BLAS this process
    loaded (NumPy's), or None where there is none (another BLAS, an older OpenBLAS, not Linux).
    In NumPy's pthreads build the setting holds for every thread, not only the caller."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


_blas_threads_local = _find_blas_threads_local()  # after NumPy loaded its BLAS
_threads = _default_threads()
_pool = None
_pool_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_users, _blas_saved = 0, None  # how many single_threaded_blas blocks are open; the setting before them


@contextmanager
def single_threaded_blas():
    """BLAS at one thread inside the block (nested and concurrent blocks share one setting; the
    last to leave restores what was there before the first). Nothing where there is no setter."""
    global _blas_users, _blas_saved
    if _blas_threads_local is None:
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = _blas_threads_local(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_threads_local(_blas_saved)


def num_threads() -> int:
    """How many threads ``map_rows`` splits work over."""
    return _threads


def set_num_threads(count: int) -> None:
    """Use ``count`` threads (≥ 1) from now on; the pool is rebuilt on next use."""
    global _threads, _pool
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"set_num_threads: need a whole number ≥ 1, got {count!r}")
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _threads, _pool = count, None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(_threads - 1, 1), thread_name_prefix="tinysft")
        return _pool


def row_blocks(n: int, blocks: int) -> list:
    """``[(start, stop), ...]``: ``[0, n)`` in ``min(blocks, n)`` contiguous blocks whose sizes differ by at most 1."""
    blocks = max(1, min(blocks, n))
    size, extra = divmod(n, blocks)
    bounds, start = [], 0
    for b in range(blocks):
        stop = start + size + (b < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def map_rows(fn, n: int, row_cost: int = 1) -> list:
    """``[fn(start, stop) for each block]`` over ``[0, n)``, the blocks run in parallel (see the module
    docstring). ``row_cost``: elements of work per row, to decide whether splitting pays."""
    if _threads == 1 or n < 2 or n * row_cost < MIN_PARALLEL:
        return [fn(0, n)]
    (first, *rest) = row_blocks(n, _threads)
    with single_threaded_blas():
        pending = [_executor().submit(fn, start, stop) for start, stop in rest]
        results = [fn(*first)]
        results.extend(future.result() for future in pending)
    return results


def split_rows(xp, fn, n: int, row_cost: int = 1) -> list:
    """``map_rows(fn, n, row_cost)`` for NumPy arrays; one call ``[fn(0, n)]`` for CuPy ones, whose
    kernels already use the whole GPU. ``xp``: the arrays' module."""
    if xp is not np:
        return [fn(0, n)]
    return map_rows(fn, n, row_cost)


def matmul(a, b):
    """``a @ b`` for NumPy arrays, over the cores with the BLAS single-threaded (see the module
    docstring): a (N, K) @ b (K, M) in blocks of N rows; a (B, ..., N, K) @ b (B, ..., K, M) or
    (K, M) in blocks of the leading batch axis. Products under ``MIN_PARALLEL_GEMM`` multiply-adds,
    and other shapes (vectors, batch axes that broadcast), are one call. CuPy arrays, one thread or a
    BLAS without the setting: plain ``a @ b``."""
    if (_threads == 1 or _blas_threads_local is None or not isinstance(a, np.ndarray)
            or not isinstance(b, np.ndarray)):
        return a @ b
    splits = a.ndim == b.ndim == 2 or (a.ndim > 2 and (b.ndim == 2 or (b.ndim == a.ndim and b.shape[0] == a.shape[0])))
    # multiply-adds: N·K·M per matrix, times the batch
    if not splits or a.shape[0] < 2 or a.size * b.shape[-1] < MIN_PARALLEL_GEMM or a.shape[-1] != b.shape[-2]:
        with single_threaded_blas():
            return a @ b
    out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                   dtype=np.result_type(a, b))

    def block(start, stop):
        np.matmul(a[start:stop], b if b.ndim == 2 else b[start:stop], out=out[start:stop])

    map_rows(block, a.shape[0], row_cost=MIN_PARALLEL)  # every block is large enough to pay
    return out
