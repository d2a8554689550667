"""tinysft.threads: the row blocks cover [0, n) once, in order; results come back in block order;
work too small to split stays on the calling thread; errors in a block reach the caller."""
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


needs_blas_threads = pytest.mark.skipif(threads._blas_threads_local is None,
                                        reason="this NumPy's BLAS has no openblas_set_num_threads_local: "
                                               "matmul is one BLAS call")

MATMUL_SHAPES = [((300, 200), (200, 150)),            # rows split
                 ((6, 40, 64), (6, 64, 50)),          # batch split
                 ((5, 3, 60, 64), (5, 3, 64, 70)),    # batch split over the first axis
                 ((6, 100, 64), (64, 90)),            # batch @ matrix
                 ((1, 300, 200), (4, 200, 150)),      # broadcast batch: one call
                 ((300, 200), (200,))]                # vector: one call


@needs_blas_threads
@pytest.mark.parametrize("a_shape, b_shape", MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_matches_float64_and_repeats_its_bits(a_shape, b_shape, dtype, two_threads, monkeypatch):
    monkeypatch.setattr(threads, "MIN_PARALLEL_GEMM", 1)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
    product = threads.matmul(a, b)
    reference = a.astype(np.float64) @ b.astype(np.float64)
    assert product.shape == reference.shape and product.dtype == dtype
    np.testing.assert_allclose(product, reference, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-11) * 30)
    np.testing.assert_array_equal(threads.matmul(a, b), product)  # the same bits for the same thread count


@needs_blas_threads
@pytest.mark.parametrize("a_shape, b_shape, split", [(s[0], s[1], i < 4) for i, s in enumerate(MATMUL_SHAPES)])
def test_matmul_splits_only_shapes_it_can_and_work_that_pays(a_shape, b_shape, split, two_threads, monkeypatch):
    calls = []
    real_map_rows = threads.map_rows
    monkeypatch.setattr(threads, "map_rows", lambda fn, n, row_cost=1: calls.append(n) or real_map_rows(fn, n, row_cost))
    a, b = np.ones(a_shape, np.float32), np.ones(b_shape, np.float32)
    monkeypatch.setattr(threads, "MIN_PARALLEL_GEMM", a.size * b.shape[-1] + 1)
    threads.matmul(a, b)
    assert calls == []  # below MIN_PARALLEL_GEMM multiply-adds: one call
    monkeypatch.setattr(threads, "MIN_PARALLEL_GEMM", 1)
    np.testing.assert_array_equal(threads.matmul(a, b), a @ b)  # sums of ones: exact either way
    assert calls == ([a_shape[0]] if split else [])


def test_matmul_is_one_call_at_one_thread_and_without_the_blas_setting(monkeypatch):
    monkeypatch.setattr(threads, "MIN_PARALLEL_GEMM", 1)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, 64)).astype(np.float32), rng.standard_normal((64, 80)).astype(np.float32)
    before = threads.num_threads()
    try:
        threads.set_num_threads(1)
        np.testing.assert_array_equal(threads.matmul(a, b), a @ b)
        threads.set_num_threads(2)
        monkeypatch.setattr(threads, "_blas_threads_local", None)
        np.testing.assert_array_equal(threads.matmul(a, b), a @ b)
    finally:
        threads.set_num_threads(before)


@needs_blas_threads
def test_blocks_run_with_single_threaded_blas_and_the_setting_comes_back(two_threads):
    """Inside map_rows (and nested single_threaded_blas blocks) BLAS has 1 thread; after the last, the old setting."""
    setter = threads._blas_threads_local
    seen = []

    def block(start, stop):
        seen.append(setter(1))  # the previous value: what the block ran with
        return start

    previous = setter(3)
    try:
        threads.map_rows(block, 1000, row_cost=1000)
        with threads.single_threaded_blas():
            with threads.single_threaded_blas():
                seen.append(setter(1))
            seen.append(setter(1))
        assert setter(3) == 3  # restored
    finally:
        setter(previous)
    assert seen == [1, 1, 1, 1]
