"""Read and write GGUF (versions 2 and 3) with NumPy alone: llama.cpp's model file format.

Layout, all little-endian:

    magic "GGUF" · u32 version · u64 tensor_count · u64 kv_count
    kv_count × (string key · u32 value_type · value)
    tensor_count × (string name · u32 n_dims · n_dims × u64 dim · u32 ggml_type · u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor's `offset` is relative to the start of this section

A string is a u64 byte length then UTF-8 bytes; an array value is u32 element type · u64 count ·
elements. GGUF lists dims innermost first (dim 0 is contiguous), so the NumPy shape is the
reversed dims: `token_embd.weight` with GGUF dims [576, 49152] is a (49152, 576) array.

    >>> write_gguf("tiny.gguf", {"general.architecture": "llama"},
    ...            {"w": np.ones((2, 32), np.float32)}, types="Q8_0")
    >>> with GGUFFile("tiny.gguf") as f:
    ...     f.metadata["general.architecture"], f.tensor_info("w").ggml_type, f.tensor("w").shape
    ('llama', 'Q8_0', (2, 32))

Dequantisation, per block of 32 values (`d`, `m` are float16 scales, `q` the stored integers):
Q8_0 `x = d·q` with q int8; Q4_0 `x = d·(q − 8)` and Q4_1 `x = d·q + m` with q in 0..15, the
block's first 16 values in the low nibbles of its 16 bytes and the last 16 in the high nibbles.
Products are float32, as in ggml. BF16 is the top half of a float32.

The reader checks every count, length and offset against the bytes the file has before it
allocates or loops (see `tinysft.io.bounds`); any malformed file raises `GGUFError` naming it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from tinysft.io.atomic import atomic_open
from tinysft.io.bounds import INT64_MAX, U32, U64, Cursor, check_layout, checked_size, paused_gc
from tinysft.io.safetensors import float32_to_bf16_bits

__all__ = ["GGUFError", "GGUFTensorInfo", "GGUFFile", "write_gguf", "GGML_TYPES"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # arrays of arrays deeper than this are rejected (real files use none)

# value type id -> (name, NumPy dtype of a scalar or array element; None for STRING and ARRAY)
VALUE_TYPES = {
    0: ("UINT8", np.dtype("<u1")), 1: ("INT8", np.dtype("<i1")), 2: ("UINT16", np.dtype("<u2")),
    3: ("INT16", np.dtype("<i2")), 4: ("UINT32", np.dtype("<u4")), 5: ("INT32", np.dtype("<i4")),
    6: ("FLOAT32", np.dtype("<f4")), 7: ("BOOL", np.dtype("<u1")), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", np.dtype("<u8")), 11: ("INT64", np.dtype("<i8")), 12: ("FLOAT64", np.dtype("<f8")),
}
_VALUE_TYPE_ID = {name: i for i, (name, _) in VALUE_TYPES.items()}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# ggml type name -> (id, values per block, bytes per block), from ggml's type traits
GGML_TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40), "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
    "Q8_K": (15, 256, 292), "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98),
    "IQ1_S": (19, 256, 50), "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82),
    "IQ4_XS": (23, 256, 136), "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8),
    "F64": (28, 1, 8), "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2), "TQ1_0": (34, 256, 54),
    "TQ2_0": (35, 256, 66), "MXFP4": (39, 32, 17),
}
_GGML_BY_ID = {tid: (name, block, size) for name, (tid, block, size) in GGML_TYPES.items()}


class GGUFError(ValueError):
    """A GGUF file (or the tensors and metadata to be written) is malformed or unsupported."""


class GGUFTensorInfo(NamedTuple):
    """One tensor's header entry. `shape` is in NumPy order (GGUF dims reversed); `offset` is the
    absolute file offset of its first byte and `nbytes` its stored (possibly quantised) size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int


# --------------------------------------------------------------------------- dequantisation
# Each takes the tensor's raw bytes (uint8, length nbytes) and returns its float32 values, flat.


def _half(b: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) bytes -> (n_blocks, 1) float32 from the little-endian float16 they hold."""
    return b.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n_blocks, 16) bytes -> (n_blocks, 32) values 0..15: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q8_0(raw):
    b = raw.reshape(-1, 34)                                            # (n_blocks, d:2 | q:32)
    return (b[:, 2:].view(np.int8).astype(np.float32) * _half(b[:, :2])).reshape(-1)


def _q4_0(raw):
    b = raw.reshape(-1, 18)                                            # (n_blocks, d:2 | qs:16)
    q = (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
    return (_half(b[:, :2]) * q).reshape(-1)


def _q4_1(raw):
    b = raw.reshape(-1, 20)                                            # (n_blocks, d:2 | m:2 | qs:16)
    return (_half(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _half(b[:, 2:4])).reshape(-1)


DEQUANTIZE = {
    "F32": lambda raw: raw.view("<f4"),
    "F16": lambda raw: raw.view("<f2").astype(np.float32),
    "BF16": lambda raw: (raw.view("<u2").astype(np.uint32) << 16).view(np.float32),
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
}


# --------------------------------------------------------------------------- reading


class GGUFFile:
    """One GGUF file: header, metadata and tensor infos parsed on open; tensor data memory-mapped.

    `metadata` maps each key to a Python value: int, float, bool or str for scalars; for arrays a
    `list[str]` (strings), a `list` (arrays of arrays), or a 1-D `np.ndarray` of the stored dtype
    (numbers and bools). `metadata_types` gives each key's GGUF type, e.g. "UINT32", "ARRAY[STRING]".
    `tensor(name)` returns float32 in NumPy order; F32 tensors are read-only views of the map.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._map = None
        with open(self.path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise self._error("empty file (not GGUF)")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _error(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def _parse(self, size: int) -> None:
        cur = Cursor(self._map, self._error)
        try:
            with paused_gc():
                self._parse_header(cur, size)
        finally:
            cur.buf.release()  # no view of the map may outlive parsing, or close() could not unmap

    def _parse_header(self, cur: Cursor, size: int) -> None:
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise self._error(f"not a GGUF file: magic {bytes(cur.buf[:4])!r}, expected {MAGIC!r}")
        (version,) = cur.unpack(U32, "version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = ("big-endian GGUF files are not supported" if swapped in (1, *VERSIONS) else
                   "GGUF v1 is not supported" if version == 1 else f"unknown GGUF version {version}")
            raise self._error(f"{why} (supported versions: {', '.join(map(str, VERSIONS))})")
        self.version = version
        (n_tensors,), (n_kv,) = cur.unpack(U64, "tensor count"), cur.unpack(U64, "metadata count")
        # Smallest possible entries: key length, type and a 1-byte value; name length, n_dims, type, offset.
        cur.need(n_kv * 13 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor infos")

        self.metadata, self.metadata_types = {}, {}
        for _ in range(n_kv):
            key = self._string(cur, "metadata key")
            if key in self.metadata:
                raise self._error(f"duplicate metadata key {key!r}")
            (vtype,) = cur.unpack(U32, f"type of metadata {key!r}")
            self.metadata[key], self.metadata_types[key] = self._value(cur, vtype, key, 0)

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.metadata_types["general.alignment"] != "UINT32" or a == 0 or a & (a - 1):
                raise self._error(f"general.alignment must be a UINT32 power of two, got "
                                  f"{self.metadata_types['general.alignment']} {a!r}")
            self.alignment = a

        entries = []
        names = set()
        for _ in range(n_tensors):
            name = self._string(cur, "tensor name")
            if name in names:
                raise self._error(f"duplicate tensor name {name!r}")
            names.add(name)
            (n_dims,) = cur.unpack(U32, f"tensor {name!r}: n_dims")
            if n_dims > MAX_DIMS:
                raise self._error(f"tensor {name!r}: {n_dims} dims (GGUF allows at most {MAX_DIMS})")
            dims = cur.unpack(struct.Struct(f"<{n_dims}Q"), f"tensor {name!r}: dims")
            (type_id,), (rel,) = cur.unpack(U32, f"tensor {name!r}: type"), cur.unpack(U64, f"tensor {name!r}: offset")
            if type_id not in _GGML_BY_ID:
                raise self._error(f"tensor {name!r}: unknown ggml type id {type_id}")
            entries.append((name, dims, type_id, rel))

        data_start = -(-cur.pos // self.alignment) * self.alignment
        self._infos = {}
        for name, dims, type_id, rel in entries:
            tname, block, block_bytes = _GGML_BY_ID[type_id]
            where = f"tensor {name!r}"
            n = checked_size(dims, INT64_MAX // 4, self._error, where)  # its float32 array must fit NumPy
            inner = dims[0] if dims else 1
            if inner % block:
                raise self._error(f"{where}: innermost dim {inner} is not a multiple of the {tname} "
                                  f"block size {block}")
            nbytes = n // block * block_bytes
            if rel % self.alignment:
                raise self._error(f"{where}: data offset {rel} is not a multiple of the alignment {self.alignment}")
            if data_start + rel + nbytes > size:
                raise self._error(f"{where}: data [{data_start + rel}, {data_start + rel + nbytes}) lies outside "
                                  f"the file ({size} bytes)")
            self._infos[name] = GGUFTensorInfo(name, tuple(reversed(dims)), tname, data_start + rel, nbytes)
        check_layout(((t.offset, t.offset + t.nbytes, t.name) for t in self._infos.values()),
                       lambda msg: self._error(f"overlapping tensor data: {msg}"))
        self.tensor_names = [name for name, *_ in entries]
        self.data_offset = data_start

    def _string(self, cur: Cursor, what: str) -> str:
        (n,) = cur.unpack(U64, what)
        raw = cur.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self._error(f"{what} at offset {cur.pos - n} is not valid UTF-8 ({e.reason})") from None

    def _value(self, cur: Cursor, vtype: int, key: str, depth: int):
        """Read one value of type id `vtype`; return (value, type name)."""
        if vtype not in VALUE_TYPES:
            raise self._error(f"metadata {key!r}: unknown value type {vtype}")
        name, dtype = VALUE_TYPES[vtype]
        if vtype == _STRING:
            return self._string(cur, f"metadata {key!r}"), name
        if vtype != _ARRAY:
            value = np.frombuffer(cur.take(dtype.itemsize, f"metadata {key!r}"), dtype)[0]
            return self._bools(value, key).item() if vtype == _BOOL else value.item(), name
        (etype,), (count,) = cur.unpack(U32, f"metadata {key!r}: array type"), cur.unpack(U64, f"metadata {key!r}: array length")
        if etype not in VALUE_TYPES:
            raise self._error(f"metadata {key!r}: unknown array element type {etype}")
        ename, edtype = VALUE_TYPES[etype]
        if edtype is not None:
            values = np.frombuffer(cur.take(count * edtype.itemsize, f"metadata {key!r}: array of {count} {ename}"),
                                   edtype).astype(edtype.newbyteorder("="))  # a copy: no view of the map survives
            return (self._bools(values, key) if etype == _BOOL else values), f"ARRAY[{ename}]"
        cur.need(count * (8 if etype == _STRING else 12), f"metadata {key!r}: array of {count} {ename}")
        if etype == _STRING:
            what = f"metadata {key!r}: string"
            return [self._string(cur, what) for _ in range(count)], f"ARRAY[{ename}]"
        if depth >= MAX_ARRAY_NESTING:
            raise self._error(f"metadata {key!r}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        items = [self._value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
        return [v for v, _ in items], f"ARRAY[{items[0][1] if items else 'ARRAY'}]"

    def _bools(self, values: np.ndarray, key: str) -> np.ndarray:
        if (values > 1).any():
            raise self._error(f"metadata {key!r}: BOOL byte other than 0 or 1")
        return values.astype(bool)

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """Header entry of one tensor (shape, ggml type, offset, size), without reading its data."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in NumPy order (dequantised; F32 is a read-only view of the map)."""
        info = self.tensor_info(name)
        if info.ggml_type not in DEQUANTIZE:
            raise self._error(f"tensor {name!r}: type {info.ggml_type} cannot be dequantised "
                              f"(supported: {', '.join(DEQUANTIZE)})")
        if self._map is None:
            raise self._error("file is closed")
        if info.nbytes == 0:
            return np.zeros(info.shape, np.float32)
        raw = np.frombuffer(self._map, np.uint8, count=info.nbytes, offset=info.offset)
        return DEQUANTIZE[info.ggml_type](raw).reshape(info.shape)

    def close(self) -> None:
        """Unmap the file; F32 views still alive keep the map until they are freed."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # exported views: the map is released with the last of them
            self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- writing


def _string_bytes(s: str) -> bytes:
    raw = s.encode("utf-8")
    return U64.pack(len(raw)) + raw


def _int_type(values: list[int]) -> str:
    """INT32 when every value fits, else INT64, else UINT64 (all values non-negative)."""
    lo, hi = min(values, default=0), max(values, default=0)
    if -2**31 <= lo and hi < 2**31:
        return "INT32"
    if -2**63 <= lo and hi < 2**63:
        return "INT64"
    if 0 <= lo and hi < 2**64:
        return "UINT64"
    raise GGUFError(f"integer {hi if hi >= 2**64 else lo} does not fit in 64 bits")


def _dtype_type(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "BOOL"
    for name, dt in VALUE_TYPES.values():
        if dt is not None and name != "BOOL" and dtype == dt.newbyteorder("="):
            return name
    raise GGUFError(f"NumPy dtype {dtype} has no GGUF value type")


def _encode_value(value, key: str) -> tuple[str, bytes]:
    """(GGUF type name, encoded bytes) of one metadata value; the typing rule is in write_gguf."""
    if isinstance(value, (bool, np.bool_)):
        return "BOOL", bytes([bool(value)])
    if isinstance(value, np.generic):
        t = _dtype_type(value.dtype)
        return t, np.asarray(value, VALUE_TYPES[_VALUE_TYPE_ID[t]][1]).tobytes()
    if isinstance(value, int):
        t = _int_type([value])
        return t, np.asarray(value, VALUE_TYPES[_VALUE_TYPE_ID[t]][1]).tobytes()
    if isinstance(value, float):
        return "FLOAT32", np.float32(value).astype("<f4").tobytes()
    if isinstance(value, str):
        return "STRING", _string_bytes(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise GGUFError(f"metadata {key!r}: arrays must be 1-D, got shape {value.shape}")
        t = _dtype_type(value.dtype)
        dt = np.dtype("u1") if t == "BOOL" else VALUE_TYPES[_VALUE_TYPE_ID[t]][1]
        return f"ARRAY[{t}]", U32.pack(_VALUE_TYPE_ID[t]) + U64.pack(len(value)) + value.astype(dt).tobytes()
    if isinstance(value, (list, tuple)):
        if not value:
            return "ARRAY[INT32]", U32.pack(_VALUE_TYPE_ID["INT32"]) + U64.pack(0)
        if all(isinstance(v, str) for v in value):
            et, body = "STRING", b"".join(_string_bytes(v) for v in value)
        elif all(isinstance(v, (list, tuple, np.ndarray)) for v in value):
            parts = [_encode_value(v, key) for v in value]
            et, body = "ARRAY", b"".join(b for _, b in parts)
        elif all(isinstance(v, (bool, np.bool_)) for v in value):
            return _encode_value(np.array(value, bool), key)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return _encode_value(np.array(value, VALUE_TYPES[_VALUE_TYPE_ID[_int_type(value)]][1]), key)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return _encode_value(np.array(value, np.float32), key)
        else:
            raise GGUFError(f"metadata {key!r}: array elements must be all strings, all bools, all numbers "
                            "or all arrays")
        return f"ARRAY[{et}]", U32.pack(_VALUE_TYPE_ID[et]) + U64.pack(len(value)) + body
    raise GGUFError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's reference Q8_0: per block d = max|x|/127, q = roundf(x/d) (ties away from zero), d as float16."""
    blocks = x.astype(np.float32).reshape(-1, 32)                                   # (n_blocks, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    y = blocks * inv
    q = np.trunc(y) + np.sign(y) * (np.abs(y - np.trunc(y)) >= 0.5)                  # C roundf
    return np.concatenate([d.astype("<f2").view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)


ENCODE = {
    "F32": lambda x: x.astype("<f4").view(np.uint8).reshape(-1),
    "F16": lambda x: x.astype("<f2").view(np.uint8).reshape(-1),
    "BF16": lambda x: float32_to_bf16_bits(x.astype(np.float32)).view(np.uint8).reshape(-1),
    "Q8_0": lambda x: _quantize_q8_0(x).reshape(-1),
}


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, object], tensors: Mapping[str, np.ndarray],
               types: Mapping[str, str] | str = "F32", alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file atomically.

    `types` is one ggml type for every tensor or a dict by name (missing names: F32); writable
    types are F32, F16, BF16 and Q8_0 (Q8_0 needs the last NumPy dim to be a multiple of 32).
    Shapes are NumPy order (written as reversed GGUF dims), at most 4 dims.

    Metadata typing: bool → BOOL; int → INT32 when it fits, else INT64, else UINT64; float →
    FLOAT32; str → STRING; a NumPy scalar keeps its own type (`np.uint32(30)` → UINT32, the way
    to type an integer explicitly); a 1-D ndarray → ARRAY of its dtype; a list → ARRAY of
    STRING, BOOL, the integer rule over all its elements, FLOAT32 (numbers with a float among
    them), or ARRAY (lists of lists); an empty list → ARRAY[INT32].
    `general.alignment` is written (UINT32) when `alignment` is not 32.
    """
    path = os.fspath(path)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: alignment must be a power of two, got {alignment}")
    metadata = dict(metadata)
    if "general.alignment" in metadata:
        raise GGUFError(f"{path}: pass alignment=... instead of a general.alignment metadata value")
    if alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = np.uint32(alignment)
    if isinstance(types, str):
        types = dict.fromkeys(tensors, types)
    unknown = set(types) - set(tensors)
    if unknown:
        raise GGUFError(f"{path}: types names tensors that are not being written: {sorted(unknown)}")

    header = bytearray(MAGIC + U32.pack(3) + U64.pack(len(tensors)) + U64.pack(len(metadata)))
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise GGUFError(f"{path}: metadata key {key!r} is not a string")
        try:
            t, body = _encode_value(value, key)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        header += _string_bytes(key) + U32.pack(_VALUE_TYPE_ID[t.split("[")[0]]) + body

    blobs, offset = [], 0
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise GGUFError(f"{path}: tensor name {name!r} is not a string")
        ggml_type = types.get(name, "F32")
        arr = np.asarray(arr)
        if ggml_type not in ENCODE:
            raise GGUFError(f"{path}: tensor {name!r}: cannot write type {ggml_type!r} (writable: {', '.join(ENCODE)})")
        if arr.ndim > MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r}: {arr.ndim} dims (GGUF allows at most {MAX_DIMS})")
        block = GGML_TYPES[ggml_type][1]
        if (arr.shape[-1] if arr.ndim else 1) % block:
            raise GGUFError(f"{path}: tensor {name!r}: {ggml_type} needs the last dim to be a multiple of "
                            f"{block}, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise GGUFError(f"{path}: tensor {name!r}: dtype {arr.dtype} is not numeric")
        blob = ENCODE[ggml_type](np.ascontiguousarray(arr))
        header += _string_bytes(name) + U32.pack(arr.ndim)
        header += struct.pack(f"<{arr.ndim}Q", *reversed(arr.shape)) + U32.pack(GGML_TYPES[ggml_type][0])
        header += U64.pack(offset)
        blobs.append(blob)
        offset += -(-blob.nbytes // alignment) * alignment

    with atomic_open(path, "wb") as f:
        f.write(header + bytes(-len(header) % alignment))
        for blob in blobs:
            f.write(blob.data)
            f.write(bytes(-blob.nbytes % alignment))
