"""optim.spans.map_spans: the parts cover every array once, in array and element order, for any
thread count; work too small to split, or not to be split, stays on the calling thread."""
import contextlib
import threading

from hypothesis import given
from hypothesis import strategies as st

from tinysft import threads
from tinysft.optim.spans import map_spans


@contextlib.contextmanager
def split_everything(workers):
    """``workers`` threads, and even one element of work is split."""
    before = threads.num_threads(), threads.MIN_PARALLEL
    threads.set_num_threads(workers)
    threads.MIN_PARALLEL = 1
    try:
        yield
    finally:
        threads.set_num_threads(before[0])
        threads.MIN_PARALLEL = before[1]


@given(sizes=st.lists(st.integers(0, 40), max_size=8), workers=st.integers(1, 4))
def test_parts_cover_each_array_once_in_order(sizes, workers):
    with split_everything(workers):
        result = map_spans(lambda k, lo, hi: (lo, hi), sizes)
    covered = {k: [] for k in range(len(sizes))}
    for k, (lo, hi) in result:
        assert 0 <= lo <= hi <= sizes[k]
        covered[k].append((lo, hi))
    assert [k for k, _ in result] == sorted(k for k, _ in result)
    for k, parts in covered.items():
        if sizes[k]:
            assert parts[0][0] == 0 and parts[-1][1] == sizes[k]
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    blocks = len(threads.row_blocks(sum(sizes), workers)) if sum(sizes) else 1
    assert len([p for p in result if p[1][0] < p[1][1]]) <= sum(map(bool, sizes)) + blocks - 1


def test_serial_spans_run_each_array_whole_on_this_thread():
    seen = set()

    def part(k, lo, hi):
        seen.add(threading.get_ident())
        return lo, hi

    with split_everything(3):
        assert map_spans(part, [5, 0, 7], parallel=False) == [(0, (0, 5)), (1, (0, 0)), (2, (0, 7))]
    assert seen == {threading.get_ident()}
