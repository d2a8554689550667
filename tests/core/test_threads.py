"""tinysft.threads: the row blocks cover [0, n) once, in order; results come back in block order;
work too small to split stays on the calling thread; errors in a block reach the caller."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinysft import threads


@given(n=st.integers(0, 1000), blocks=st.integers(1, 9))
def test_row_blocks_partition(n, blocks):
    bounds = threads.row_blocks(n, blocks)
    assert len(bounds) == max(1, min(blocks, n))
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.fixture
def two_threads():
    before = threads.num_threads()
    threads.set_num_threads(2)
    yield
    threads.set_num_threads(before)


def test_map_rows_splits_large_work_and_keeps_order(two_threads):
    x = np.random.default_rng(0).standard_normal((1000, 300))
    expected = np.exp(x)
    seen = []

    def block(start, stop):
        seen.append(threading.get_ident())
        np.exp(x[start:stop], out=x[start:stop])
        return start

    assert threads.map_rows(block, len(x), row_cost=x.shape[1]) == [0, 500]
    assert len(set(seen)) == 2  # the second block ran on a pool thread
    np.testing.assert_array_equal(x, expected)


def test_map_rows_keeps_small_work_on_the_calling_thread(two_threads):
    seen = []
    assert threads.map_rows(lambda a, b: seen.append(threading.get_ident()) or (a, b), 10, row_cost=10) == [(0, 10)]
    assert seen == [threading.get_ident()]


def test_map_rows_raises_a_blocks_error(two_threads):
    def block(start, stop):
        if start > 0:
            raise ValueError("second block")
        return start

    with pytest.raises(ValueError, match="second block"):
        threads.map_rows(block, 1000, row_cost=1000)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="set_num_threads"):
        threads.set_num_threads(bad)


@pytest.mark.parametrize("value, message", [("two", "whole number"), ("0", "at least 1")])
def test_bad_thread_variable_is_named(monkeypatch, value, message):
    monkeypatch.setenv("TINYSFT_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"TINYSFT_NUM_THREADS.*{message}"):
        threads._default_threads()


def _openblas_timeout_after_import(env):
    """OPENBLAS_THREAD_TIMEOUT as OpenBLAS read it in a fresh process that imports tinysft first (None: not OpenBLAS)."""
    script = ("import ctypes, tinysft\n"
              "paths = sorted({l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l.rsplit('/', 1)[-1].lower()})\n"
              "get = getattr(ctypes.CDLL(paths[0]), 'openblas_thread_timeout', None) if paths else None\n"
              "print(get() if get else 'none')")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    return None if out.strip() == "none" else int(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_importing_tinysft_first_makes_idle_openblas_threads_sleep_at_once():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    read = _openblas_timeout_after_import(env)
    if read is None:
        pytest.skip("this NumPy's BLAS is not an OpenBLAS with openblas_thread_timeout")
    assert read == 4
    assert _openblas_timeout_after_import({**env, "OPENBLAS_THREAD_TIMEOUT": "20"}) == 20  # a user's value is kept
