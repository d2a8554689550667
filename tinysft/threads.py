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

GEMMs are left to the BLAS, which threads them itself and shares its packed panels between its
threads (splitting a product's rows over these blocks instead measured up to 2x slower at
512×512×512). Importing tinysft before NumPy sets ``OPENBLAS_THREAD_TIMEOUT`` so that OpenBLAS's
idle workers sleep at once rather than spin beside these blocks (``tinysft/__init__.py``).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["MIN_PARALLEL", "num_threads", "set_num_threads", "row_blocks", "map_rows", "split_rows"]

MIN_PARALLEL = 1 << 16
"""Elements below which ``map_rows`` runs on the calling thread alone (~64K floats: tens of µs of work)."""


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


_threads = _default_threads()
_pool = None
_pool_lock = threading.Lock()


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
