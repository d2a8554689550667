"""Bounds checks shared by the readers of untrusted files (safetensors, GGUF).

Every length, count and offset read from a file is compared with the bytes the
file actually has *before* anything is allocated or looped over, so a hostile
header costs time and memory linear in its own size and fails with the reader's
own exception, naming the file.

    >>> cur = Cursor(b"\\x02\\x00\\x00\\x00ab", error=ValueError)
    >>> cur.unpack(U32, "length")[0], bytes(cur.take(2, "name"))
    (2, b'ab')
"""

from __future__ import annotations

import contextlib
import gc
import json
import struct
from collections.abc import Callable, Iterable, Iterator

U8, U16, U32, U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))
INT64_MAX = 2**63 - 1


class Cursor:
    """Sequential little-endian reads from a buffer; a read past the end raises `error(message)`.

    `error` is the reader's exception factory: it receives a message without the
    file name and returns the exception to raise (the reader adds the name).
    """

    def __init__(self, buf, error: Callable[[str], Exception], pos: int = 0):
        self.buf = memoryview(buf).cast("B")
        self.pos = pos
        self.error = error

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        """Raise unless `n` more bytes are available (n may be any non-negative int, however large)."""
        if n > self.remaining:
            raise self.error(f"{what} needs {n} bytes at offset {self.pos} but only {self.remaining} remain "
                             "(truncated or corrupt file)")

    def take(self, n: int, what: str) -> memoryview:
        """The next `n` bytes, as a view (no copy)."""
        self.need(n, what)
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        """Unpack one fixed-size struct at the cursor."""
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values


def unique_keys_object(pairs: list, error: Callable[[str], Exception]) -> dict:
    """A ``json`` ``object_pairs_hook``: the object, or ``error(key)`` for its first repeated key
    (Python's ``json`` would silently keep the last copy)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise error(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def parse_json_object(text: str, error: Callable[[str], Exception], decoder: json.JSONDecoder = None) -> dict:
    """The JSON object that ``text`` holds, decoded by ``decoder`` (default: plain ``json``); else
    ``error(message)`` for invalid JSON, nesting too deep for Python's parser, or a value that is
    not an object. The caller's ``error`` adds where the text came from (file, line, request)."""
    try:
        value = (decoder or _PLAIN_JSON).decode(text)
    except RecursionError:
        raise error("JSON nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError
        raise error(f"invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"expected a JSON object, got {type(value).__name__}")
    return value


_PLAIN_JSON = json.JSONDecoder()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cycle collector while a header's objects are built.

    A parsed header holds no reference cycles, but creating many containers triggers
    collections that rescan the growing heap; for a header of 40,000 tensors that is about a
    third of the parse time.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def checked_size(dims: Iterable[int], limit: int, error: Callable[[str], Exception], what: str) -> int:
    """Number of elements of a shape of non-negative `dims`; raise `error` when the product of its
    non-zero dims exceeds `limit`.

    Zero dims count too: NumPy refuses a shape like (0, 2**62, 4) of float32, whose non-zero dims
    overflow its byte count, so such a shape is rejected although it holds no element. Stops at the
    first overflow, so a shape like [2**62, 2**62, ...] costs O(ndim) with small integers.
    """
    dims = list(dims)
    n = 1
    for d in dims:
        n *= d or 1
        if n > limit:
            raise error(f"{what}: shape {dims} is too large ({limit} elements at most)")
    return 0 if 0 in dims else n


def check_layout(regions: Iterable[tuple[int, int, str]], error: Callable[[str], Exception],
                 cover: int | None = None) -> list:
    """Check byte regions `(begin, end, name)` of a data section; return them sorted by (begin, end).

    Without `cover`, non-empty regions must not overlap (empty ones may sit anywhere). With
    `cover=n` they must tile [0, n) exactly: in sorted order each region begins where the one
    before it ended, so there is no hole, no overlap and no byte after the last one.
    O(n log n) in the number of regions.
    """
    ordered = sorted(regions, key=lambda r: (r[0], r[1]))
    reach, owner = 0, None  # where the regions so far end, and the region that ends there
    for r in ordered:
        begin, end, name = r
        if end < begin:
            raise error(f"{name!r}: bytes [{begin}, {end}) end before they begin")
        if begin < reach and (begin < end or cover is not None):
            raise error(f"{name!r}: bytes [{begin}, {end}) overlap {owner[2]!r} at [{owner[0]}, {owner[1]})")
        if cover is not None and begin > reach:
            after = f"the end of {owner[2]!r} at {reach}" if owner else "the start of the data"
            raise error(f"{name!r}: bytes [{begin}, {end}) leave a hole of {begin - reach} bytes after {after}")
        if end >= reach:
            reach, owner = end, r
    if cover is not None and reach != cover:
        after = f"the end of {owner[2]!r}" if owner else "the start of the data"
        raise error(f"{cover - reach} bytes after {after} belong to no region (the data buffer has {cover})"
                    if reach < cover else f"{owner[2]!r} ends at byte {reach}, outside the data buffer of {cover} bytes")
    return ordered
