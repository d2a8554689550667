"""Read and write the safetensors format with NumPy alone (no pickle, no torch).

Layout: an 8-byte little-endian u64 header length N, then N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor buffer; offsets are relative to the buffer start.
The reader validates the whole header before it touches any tensor data, in time linear in
its size, and accepts exactly the files the reference `safetensors` package accepts and NumPy
can hold, with one deliberate difference: a duplicate key, which the format forbids but the
reference reader lets the last copy win, is rejected. The tensors must tile the buffer exactly
(no hole, no overlap, no trailing byte). Every failure is a `SafetensorsError` naming the file.

    >>> save_file({"w": np.ones((2, 3), np.float32)}, "model.safetensors", metadata={"step": "10"})
    >>> load_file("model.safetensors")["w"].shape
    (2, 3)
    >>> with SafetensorsFile("model.safetensors") as f:
    ...     f.keys(), f.metadata, f.get("w").dtype
    (['w'], {'step': '10'}, dtype('float32'))

BF16 tensors are read as float32 (the 16 stored bits become the high half of a
float32); `save_file(..., dtypes={"w": "BF16"})` rounds float32 to BF16 to nearest-even.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from tinysft.io.atomic import atomic_open
from tinysft.io.bounds import INT64_MAX, check_layout, checked_size, paused_gc, unique_keys_object

__all__ = ["SafetensorsError", "TensorInfo", "SafetensorsFile", "load_file", "save_file"]

# safetensors dtype -> NumPy storage dtype (little-endian). BF16 is stored as raw u16 bits.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "C64": np.dtype("<c8"),
}
# Valid in the format but with no NumPy type (sub-byte and 8-bit floats): rejected with their own message.
NON_NUMPY_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_FROM_NUMPY = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "BF16"}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
# NumPy caps an array's byte count (zero dims aside) at 2**63 - 1; BF16 is returned as float32.
_MAX_ELEMENTS = {k: INT64_MAX // (4 if k == "BF16" else v) for k, v in _ITEMSIZE.items()}
MAX_HEADER_BYTES = 100_000_000  # same cap as the reference implementation
JSON_MAX_DEPTH = 127  # nesting the reference reader's JSON parser (serde_json) allows
NUMPY_MAX_DIMS = 64
U64_MAX = 2**64 - 1
_INT = {int}


class SafetensorsError(ValueError):
    """A safetensors file (or a tensor dict to be saved) is malformed."""


class TensorInfo(NamedTuple):
    """One header entry; `begin`/`end` are byte offsets into the data buffer (a tuple: 40,000 of
    them are built in a few milliseconds)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


# --------------------------------------------------------------------------- reading
# The header is JSON as the reference reader (Rust serde_json) reads it. Python's json module is
# more lenient in five ways, each closed here: NaN/Infinity literals, numbers beyond float range,
# lone UTF-16 surrogate escapes, nesting deeper than serde's limit (and Python's RecursionError),
# and integers serde reads as floats (negative ones, -0, beyond u64) that must not pass as sizes.
# Duplicate keys, which the format forbids, are rejected in every object.


class _Reject(Exception):
    """Raised from inside json.loads by the hooks below."""


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Reject(f"number {text[:30]!r} is out of range")
    return value


def _json_int(text: str) -> int | float:
    """Non-negative integers up to 2**64 - 1 stay int (what a size may be); others become float."""
    if text[0] != "-" and (len(text) < 20 or len(text) == 20 and int(text) <= U64_MAX):
        return int(text)
    return _json_float(text)


def _json_constant(text: str):
    raise _Reject(f"{text} is not valid JSON")


def _json_object(pairs: list) -> dict:
    return unique_keys_object(pairs, lambda key: _Reject(f"duplicate key {key!r}"))


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _load_json(text: str):
    try:
        obj = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int, parse_float=_json_float,
                         parse_constant=_json_constant)
    except RecursionError:
        raise _Reject(f"JSON nested deeper than {JSON_MAX_DEPTH}") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: only then look for a lone surrogate among the strings
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject("a \\u escape is a lone UTF-16 surrogate") from None
    return obj


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _dtype_name(dtype) -> str | None:
    """A dtype is a string or, as serde also reads enums, an object {"NAME": null}."""
    if isinstance(dtype, str):
        return dtype
    if isinstance(dtype, dict) and len(dtype) == 1:
        (name, unit), = dtype.items()
        return name if unit is None else None
    return None


def _parse_header(raw: bytes, buffer_size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header and return ({name: TensorInfo}, metadata); raise SafetensorsError.

    Accepts exactly what the reference reader accepts and NumPy can represent, except duplicate
    keys. A tensor entry is an object with dtype, shape and data_offsets (other keys are ignored)
    or the list [dtype, shape, data_offsets]; the tensors must tile the data buffer exactly.
    """

    def fail(msg: str, name: str | None = None):
        where = f"{path}: tensor {name!r}: " if name is not None else f"{path}: "
        return SafetensorsError(where + msg)

    try:
        header = _load_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, _Reject) as e:
        raise fail(f"invalid JSON header: {e}") from None
    if not isinstance(header, dict):
        raise fail(f"invalid header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("invalid __metadata__: expected an object mapping strings to strings")

    infos = {}
    for name, entry in header.items():
        try:
            if isinstance(entry, list) and len(entry) == 3:
                dtype, shape, offsets = entry
            else:
                dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError):
            raise fail("entry must be an object with the keys dtype, shape, data_offsets "
                       "(or the list [dtype, shape, data_offsets])", name) from None
        if len(entry) > 3 and 2 + max(_depth(v) for v in entry.values()) > JSON_MAX_DEPTH:
            raise fail(f"an ignored field nests JSON deeper than {JSON_MAX_DEPTH}", name)
        dtype, given = _dtype_name(dtype), dtype
        if dtype not in DTYPES:
            why = "has no NumPy type" if dtype in NON_NUMPY_DTYPES else "is unknown"
            raise fail(f"dtype {given!r} {why} (supported: {', '.join(DTYPES)})", name)
        if type(shape) is not list or not set(map(type, shape)) <= _INT:  # bool is not int here
            raise fail(f"shape must be a list of non-negative integers, got {shape!r}", name)
        if len(shape) > NUMPY_MAX_DIMS:
            raise fail(f"shape has {len(shape)} dims (NumPy allows {NUMPY_MAX_DIMS})", name)
        n = checked_size(shape, _MAX_ELEMENTS[dtype], lambda m: fail(m, name), "too large for NumPy")
        if type(offsets) is not list or len(offsets) != 2 or not set(map(type, offsets)) <= _INT:
            raise fail(f"data_offsets must be a list of two non-negative integers, got {offsets!r}", name)
        begin, end = offsets
        if end - begin != n * _ITEMSIZE[dtype]:
            raise fail(f"size mismatch: shape {shape} of {dtype} needs {n * _ITEMSIZE[dtype]} bytes but "
                       f"data_offsets [{begin}, {end}] span {end - begin}", name)
        infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)

    check_layout(((t.begin, t.end, t.name) for t in infos.values()),
                 lambda m: fail(f"data_offsets do not tile the data buffer: {m}"), cover=buffer_size)
    return infos, metadata


def _decode(raw: np.ndarray, info: TensorInfo) -> np.ndarray:
    """View raw bytes as the tensor; BF16 becomes float32."""
    arr = raw.view(DTYPES[info.dtype]).reshape(info.shape)
    if info.dtype == "BF16":
        return (arr.astype("<u4") << 16).view("<f4")
    return arr


class SafetensorsFile:
    """Lazy access to one safetensors file; only the header is read on open.

    With `mmap=True`, `get` returns read-only views of a memory map (BF16 is
    always converted, hence copied); otherwise each `get` reads a fresh copy.
    """

    def __init__(self, path: str | os.PathLike, mmap: bool = False):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self._infos, self.metadata, self._data_start, buffer_size = self._read_header()
            self._map = None
            if mmap and buffer_size > 0:
                self._map = np.memmap(self._file, dtype=np.uint8, mode="r",
                                      offset=self._data_start, shape=(buffer_size,))
        except BaseException:
            self._file.close()
            raise

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: file is truncated: {size} bytes cannot hold the 8-byte header length")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > size - 8:
            raise SafetensorsError(f"{self.path}: header length {n} runs past the end of the file ({size} bytes)")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{self.path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        with paused_gc():
            infos, metadata = _parse_header(self._file.read(n), size - 8 - n, self.path)
        return infos, metadata, 8 + n, size - 8 - n

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return [t.name for t in sorted(self._infos.values(), key=lambda t: t.begin)]

    def info(self, name: str) -> TensorInfo:
        """Header entry (dtype, shape, offsets) of one tensor, without reading its data."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """Read one tensor as a NumPy array."""
        info = self.info(name)
        n = info.end - info.begin
        if self._map is not None:
            raw = np.asarray(self._map[info.begin:info.end])  # plain read-only view
        else:
            raw = np.empty(n, np.uint8)
            self._file.seek(self._data_start + info.begin)
            if self._file.readinto(memoryview(raw)) != n:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: file ended while reading its data")
        return _decode(raw, info)

    def close(self) -> None:
        self._map = None
        self._file.close()

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_file(path: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
    """Load every tensor; with `mmap=True` arrays are read-only memory-mapped views."""
    with SafetensorsFile(path, mmap=mmap) as f:
        return {name: f.get(name) for name in f.keys()}


# --------------------------------------------------------------------------- writing


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 (nearest, ties to even) and return the raw u16 bits; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    quiet_nan = ((u >> 16) | 0x0040).astype("<u2")
    return np.where(np.isnan(x), quiet_nan, rounded)


def _encode(name: str, arr, dtype: str | None) -> tuple[str, np.ndarray]:
    """Return (safetensors dtype, contiguous little-endian array) for one tensor."""
    arr = np.asarray(arr)
    if dtype is None:
        dtype = _FROM_NUMPY.get(arr.dtype.newbyteorder("="))
        if dtype is None:
            raise SafetensorsError(f"tensor {name!r}: NumPy dtype {arr.dtype} has no safetensors equivalent")
    elif dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if dtype == "BF16":
        return dtype, float32_to_bf16_bits(arr.astype(np.float32)).reshape(arr.shape)
    return dtype, arr.astype(DTYPES[dtype], order="C", copy=False)  # keeps 0-d shape


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None, dtypes: Mapping[str, str] | None = None) -> None:
    """Write `tensors` atomically; `dtypes` optionally stores some tensors as another dtype (e.g. "BF16")."""
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError("metadata must map strings to strings")
    dtypes = dict(dtypes or {})
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise SafetensorsError(f"dtypes names tensors that are not being saved: {sorted(unknown)}")
    encoded = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"invalid tensor name {name!r}")
        encoded[name] = _encode(name, arr, dtypes.get(name))

    # Widest dtypes first keeps every tensor aligned once the buffer start is 8-aligned.
    order = sorted(encoded, key=lambda k: -encoded[k][1].itemsize)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, arr = encoded[name]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)

    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(encoded[name][1].reshape(-1).view(np.uint8).data)
