"""Many arrays' worth of elementwise work over the cores, with one wait for the threads.

An optimizer step or a clipping pass touches every parameter once: ~100 arrays, from
a few elements to millions. Splitting each array over the threads on its own makes a
step wait for the threads once per array, which costs milliseconds on a busy machine.
``map_spans`` lays the arrays end to end instead, cuts that one range into a block per
thread (``threads.map_rows``) and hands each block its parts of the arrays:

    sizes = [a.size for a in arrays]
    def part(k, lo, hi):                    # elements [lo, hi) of array k
        np.multiply(arrays[k][lo:hi], 0.5, out=arrays[k][lo:hi])
    map_spans(part, sizes)

The blocks depend only on the sizes and the thread count; the results come back in
array order and, within an array, in element order.
"""
import bisect
import itertools

from ..threads import map_rows

__all__ = ["map_spans"]


def map_spans(part, sizes, cost: int = 1, parallel: bool = True) -> list:
    """``[(k, part(k, lo, hi)), ...]`` over the parts ``[lo, hi)`` of arrays ``k`` (``sizes[k]``
    elements each) that the threads' blocks cover, in order. ``cost``: work per element.
    ``parallel=False`` (GPU arrays, whose kernels queue up anyway): each array whole, here."""
    if not parallel:
        return [(k, part(k, 0, size)) for k, size in enumerate(sizes)]
    ends = list(itertools.accumulate(sizes))  # array k holds [ends[k] - sizes[k], ends[k]) of the range
    if not ends:
        return []

    def block(start, stop):
        results, k = [], bisect.bisect_right(ends, start)  # the first array that reaches past start
        while k < len(ends) and ends[k] - sizes[k] < stop:
            offset = ends[k] - sizes[k]
            results.append((k, part(k, max(start, offset) - offset, min(stop, ends[k]) - offset)))
            k += 1
        return results

    return [result for block_results in map_rows(block, ends[-1], cost) for result in block_results]
