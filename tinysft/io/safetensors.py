"""Read and write the safetensors format with NumPy alone (no pickle, no torch).

Layout: an 8-byte little-endian u64 header length N, then N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor buffer; offsets are relative to the buffer start.
The reader validates the whole header before it touches any tensor data.

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

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tinysft.io.atomic import atomic_open

__all__ = ["SafetensorsError", "TensorInfo", "SafetensorsFile", "load_file", "save_file"]

# safetensors dtype -> NumPy storage dtype (little-endian). BF16 is stored as raw u16 bits.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_FROM_NUMPY = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER_BYTES = 100_000_000  # same cap as the reference implementation


class SafetensorsError(ValueError):
    """A safetensors file (or a tensor dict to be saved) is malformed."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; `begin`/`end` are byte offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


# --------------------------------------------------------------------------- reading


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise SafetensorsError(f"duplicate keys {sorted(dup)}")
    return dict(pairs)


def _parse_header(raw: bytes, buffer_size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header and return ({name: TensorInfo}, metadata); raise SafetensorsError."""

    def fail(msg: str, name: str | None = None):
        where = f"{path}: tensor {name!r}: " if name is not None else f"{path}: "
        raise SafetensorsError(where + msg)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, SafetensorsError) as e:
        fail(f"invalid JSON header: {e}")
    if not isinstance(header, dict):
        fail(f"invalid header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        fail("invalid __metadata__: expected an object mapping strings to strings")

    infos = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            fail("entry must be an object with exactly the keys dtype, shape, data_offsets", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            fail(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            fail(f"shape must be a list of non-negative integers, got {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            fail(f"data_offsets must be a list of two integers, got {offsets!r}", name)
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_size:
            fail(f"data_offsets [{begin}, {end}] lie outside the data buffer of {buffer_size} bytes", name)
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            fail(f"size mismatch: shape {shape} of {dtype} needs {expected} bytes but data_offsets "
                 f"[{begin}, {end}] span {end - begin}", name)
        infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)

    ordered = sorted(infos.values(), key=lambda t: (t.begin, t.end))
    for prev, cur in itertools.pairwise(ordered):
        if cur.begin < prev.end:
            fail(f"data_offsets [{cur.begin}, {cur.end}] overlap tensor {prev.name!r} "
                 f"at [{prev.begin}, {prev.end}]", cur.name)
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
