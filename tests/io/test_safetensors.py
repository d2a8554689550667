import json
import os
import re
import struct
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinysft.io.safetensors import SafetensorsError, SafetensorsFile, float32_to_bf16_bits, load_file, save_file

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


def write_raw(path, header, data=b""):
    """Write a safetensors file by hand; `header` is a JSON-able object or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


# --------------------------------------------------------------------------- round trips

tensor_dicts = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8).filter(
        lambda s: s != "__metadata__"),
    st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                                max_side=4))),
    max_size=4,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts, metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_round_trip_random_dtypes_and_shapes(tensors, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        save_file(tensors, path, metadata=metadata)
        with open(path, "rb") as f:
            assert (8 + struct.unpack("<Q", f.read(8))[0]) % 8 == 0  # header padded: data starts 8-aligned
        for mmap in (True, False):
            loaded = load_file(path, mmap=mmap)
            assert loaded.keys() == tensors.keys()
            for name, arr in tensors.items():
                assert loaded[name].dtype == arr.dtype and loaded[name].shape == arr.shape
                np.testing.assert_array_equal(loaded[name], arr)
        with SafetensorsFile(path) as f:
            assert f.metadata == metadata
            assert sorted(f.keys()) == sorted(tensors)


def test_zero_d_empty_and_non_contiguous(tmp_path):
    tensors = {"scalar": np.array(3, np.int64), "empty": np.zeros((0, 5), np.float32),
               "transposed": np.arange(12.0).reshape(3, 4).T, "big_endian": np.arange(4, dtype=">i4")}
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = load_file(tmp_path / "t.safetensors")
    assert loaded["scalar"].shape == () and loaded["scalar"] == 3
    assert loaded["empty"].shape == (0, 5)
    np.testing.assert_array_equal(loaded["transposed"], tensors["transposed"])
    assert loaded["big_endian"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(loaded["big_endian"], [0, 1, 2, 3])


def test_empty_dict_and_mmap_is_read_only(tmp_path):
    save_file({}, tmp_path / "e.safetensors")
    assert load_file(tmp_path / "e.safetensors") == {}
    save_file({"w": np.ones(3, np.float32)}, tmp_path / "w.safetensors")
    assert not load_file(tmp_path / "w.safetensors", mmap=True)["w"].flags.writeable
    copy = load_file(tmp_path / "w.safetensors", mmap=False)["w"]
    copy[0] = 5  # copies are writable


def test_lazy_access(tmp_path):
    save_file({"a": np.arange(3, dtype=np.int32), "b": np.eye(2)}, tmp_path / "t.safetensors", metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert "a" in f and "zzz" not in f and len(f) == 2
        assert f.info("b").dtype == "F64" and f.info("b").shape == (2, 2)
        np.testing.assert_array_equal(f.get("b"), np.eye(2))
        with pytest.raises(KeyError, match="zzz"):
            f.get("zzz")


# --------------------------------------------------------------------------- BF16


def bf16_reference(x: np.float32) -> np.float32:
    """Nearest BF16 value of a finite float32, comparing the two candidates in float64; ties go to even."""
    bits = int(np.array(x, np.float32).view(np.uint32))
    lo = bits & 0xFFFF0000
    candidates = [lo, lo + 0x10000]
    # The step past the largest finite value is 2**128 (IEEE rounds ties there to infinity).
    values = [np.copysign(2.0 ** 128, float(x)) if c & 0x7FFFFFFF == 0x7F800000
              else float(np.array(c, np.uint32).view(np.float32)) for c in candidates]
    d = [abs(v - float(x)) for v in values]
    if d[0] == d[1]:
        pick = candidates[0] if (candidates[0] >> 16) % 2 == 0 else candidates[1]
    else:
        pick = candidates[int(d[1] < d[0])]
    return np.array(pick & 0xFFFFFFFF, np.uint32).view(np.float32)


@example(np.array([3.3961775e38, -3.3961775e38, 3.396177e38, 1.00390625, 1.01171875, 1e-45], np.float32))
@given(hnp.arrays(np.float32, st.integers(0, 20), elements=st.floats(width=32, allow_nan=False,
                                                                     allow_infinity=False)))
def test_bf16_rounds_to_nearest_even(x):
    bits = float32_to_bf16_bits(x)
    got = (bits.astype(np.uint32) << 16).view(np.float32)
    want = np.array([bf16_reference(v) for v in x], np.float32).reshape(x.shape)
    np.testing.assert_array_equal(got, want)


def test_bf16_file_round_trip(tmp_path):
    x = np.array([[1.0, 1.00390625, 1.01171875], [-np.inf, np.nan, 3.4e38]], np.float32)
    save_file({"x": x, "y": x}, tmp_path / "b.safetensors", dtypes={"x": "BF16"})
    with SafetensorsFile(tmp_path / "b.safetensors") as f:
        assert f.info("x").dtype == "BF16" and f.info("y").dtype == "F32"
        got = f.get("x")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, [[1.0, 1.0, 1.015625], [-np.inf, np.nan, np.inf]])


def test_reads_handwritten_bf16(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001], "<u2")  # 1, -2, inf, smallest subnormal
    path = write_raw(tmp_path / "h.safetensors",
                     {"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bits.tobytes())
    np.testing.assert_array_equal(load_file(path)["x"], [1.0, -2.0, np.inf, np.float32(2.0 ** -133)])


# --------------------------------------------------------------------------- hostile files


def good_file(tmp_path):
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.int64)}, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


E = '"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]'  # an entry's fields, its closing brace left open


@pytest.mark.parametrize("header, data, match", [
    (b"{not json", b"", "invalid JSON header"),
    (b"\xff\xfe", b"", "invalid JSON header"),
    (b"[1, 2]", b"", "expected a JSON object"),
    (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "t": 1}', b"", "duplicate key 't'"),
    (b'{"__metadata__": {"a": "1", "a": "2"}}', b"", "duplicate key 'a'"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "nested deeper than 127"),
    (("{" + E + ',"x":' + "[" * 126 + "]" * 126 + "}}").encode(), bytes(8), "'t'.*deeper than 127"),
    (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', bytes(8), "NaN is not valid JSON"),
    (("{" + E + ',"x":1e400}}').encode(), bytes(8), "out of range"),
    (("{" + E + ',"x":"\\udc00"}}').encode(), bytes(8), "lone UTF-16 surrogate"),
    ({"t": entry(dtype="Q7")}, bytes(8), "'t'.*dtype 'Q7' is unknown"),
    ({"t": entry(dtype=["F32"])}, bytes(8), r"'t'.*dtype \['F32'\] is unknown"),
    ({"t": entry(dtype={"F32": 1})}, bytes(8), "'t'.*dtype .* is unknown"),
    ({"t": entry(dtype="F8_E4M3", shape=(8,))}, bytes(8), "'t'.*F8_E4M3' has no NumPy type"),
    ({"t": entry(shape=(-2,))}, bytes(8), "'t'.*non-negative integers"),
    (b'{"t": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"", "'t'.*non-negative integers"),
    ({"t": entry(shape=(2.0,))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(shape=(True, 2))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(shape=(2**64,))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(shape=(2**40, 2**40), offsets=(0, 8))}, bytes(8), "'t'.*too large for NumPy"),
    ({"t": entry(shape=(0, 2**62), offsets=(0, 0))}, b"", "'t'.*too large for NumPy"),
    ({"t": entry(shape=(1,) * 65, offsets=(0, 4))}, bytes(4), "'t'.*65 dims"),
    ({"t": entry(offsets=(0,))}, bytes(8), "'t'.*two non-negative integers"),
    ({"t": entry(offsets=(0, "8"))}, bytes(8), "'t'.*two non-negative integers"),
    ({"t": entry(offsets=(8, 0))}, bytes(8), "'t'.*size mismatch"),
    ({"t": entry(offsets=(0, 12))}, bytes(12), "'t'.*size mismatch"),
    ({"t": entry(shape=(3,))}, bytes(8), "'t'.*size mismatch"),
    ({"t": entry(offsets=(4, 12))}, bytes(12), "'t'.*hole of 4 bytes after the start of the data"),
    ({"t": entry(offsets=(0, 8))}, bytes(9), "1 bytes after the end of 't' belong to no region"),
    ({"t": entry(offsets=(0, 8))}, bytes(4), "'t' ends at byte 8, outside the data buffer of 4 bytes"),
    ({}, b"x", "1 bytes after the start of the data belong to no region"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12), "'b'.*overlap 'a'"),
    ({"a": entry(), "z": entry(shape=(0,), offsets=(4, 4))}, bytes(8), "'z'.*overlap 'a'"),
    ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), "'t'.*the keys dtype, shape, data_offsets"),
    ({"t": ["F32", [2]]}, bytes(8), "'t'.*the keys dtype, shape, data_offsets"),
    ({"t": None}, b"", "'t'.*the keys dtype"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ({"__metadata__": ["k"]}, b"", "__metadata__"),
])
def test_invalid_headers_raise(tmp_path, header, data, match):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=match) as err:
        load_file(path)
    assert str(err.value).startswith(path + ": ")
    assert isinstance(err.value, ValueError)


def test_forms_the_reference_reader_also_accepts(tmp_path):
    """Leading/trailing whitespace, ignored extra fields, {"F32": null} dtypes, list entries, null
    metadata, zero-size tensors anywhere on a boundary, the widest dims NumPy holds."""
    data = np.arange(2, dtype="<f4").tobytes() + np.arange(3, dtype="<u2").tobytes()
    header = ('\n\t {"__metadata__": null, "a": {"data_offsets": [0, 8], "shape": [2], "dtype": {"F32": null},'
              ' "extra": [1, -0, 1e-400, {"k": "\\ud83d\\ude00"}, ' + "[" * 120 + "]" * 120 + '], "more": null},'
              ' "b": ["U16", [3], [8, 14]], "z0": ["F64", [0, 5], [0, 0]], "z1": ["I8", [7, 0], [8, 8]],'
              ' "z2": ["U8", [0, 9223372036854775807], [14, 14]]}  \r\n')
    path = write_raw(tmp_path / "ok.safetensors", header.encode(), data)
    with SafetensorsFile(path) as f:
        assert f.metadata == {} and f.keys()[:2] == ["a", "z0"] and len(f) == 5
        np.testing.assert_array_equal(f.get("a"), [0, 1])
        assert f.get("b").dtype == np.uint16 and f.get("b").tolist() == [0, 1, 2]
        assert f.get("z2").shape == (0, 2**63 - 1) and f.get("z1").shape == (7, 0)


def test_truncated_file(tmp_path):
    raw = good_file(tmp_path).read_bytes()
    for cut, match in [(3, "truncated"), (len(raw) - 4, "outside the data buffer"), (20, "runs past the end")]:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(raw[:cut])
        with pytest.raises(SafetensorsError, match=match):
            load_file(path)


def test_header_length_past_eof(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SafetensorsError, match="header length 1000000 runs past the end of the file"):
        SafetensorsFile(path)


def many_empty_tensors(n):
    return {f"tensor_{i:05d}": entry(shape=(0,), offsets=(0, 0)) for i in range(n)}


def test_40000_empty_tensors_parse_in_linear_time(tmp_path):
    """A legal 2.9 MB header of 40,000 zero-size tensors: well under a second, and 4x the entries
    cost about 4x the time (a quadratic step would cost 16x)."""
    def cpu_seconds(n):
        path = write_raw(tmp_path / f"many{n}.safetensors", many_empty_tensors(n))
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            with SafetensorsFile(path) as f:
                assert len(f) == n
            best = min(best, time.process_time() - t0)
        return best
    small, large = cpu_seconds(10_000), cpu_seconds(40_000)
    assert large < 1.0, large
    assert large < 8 * small + 0.05, (small, large)


# --------------------------------------------------------------------------- the reference reader as oracle
# Headers are generated as JSON text, valid and not: every dtype spelling (names, {"NAME": null},
# unknown, non-NumPy), shapes with small, huge, negative, float, boolean and -0 dims, offsets that
# tile the buffer or leave holes, overlaps and trailing bytes, list-form entries, missing and extra
# fields holding arbitrary JSON (deep nesting, NaN, 1e400, lone surrogates, 400-digit integers),
# metadata of every type, duplicate names, stray whitespace, then sometimes a byte flipped, inserted
# or cut and a wrong header length. The verdict must be the reference package's (`deserialize`,
# whose arrays `safetensors.numpy` builds; BF16, which it has no NumPy type for, read as float32
# bits here), except that a duplicate key is always rejected; accepted files must give the same
# tensors and metadata.

ALL_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
              "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F4": 0.5}
SPECIAL_NUMBERS = ["-0", "-1", "1.0", "2e0", "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity",
                   "18446744073709551615", "18446744073709551616", "9223372036854775807", "1" + "0" * 400,
                   "true", "false", "null", '"3"']
scalar_json = st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=4).map(json.dumps), st.sampled_from(SPECIAL_NUMBERS),
    st.sampled_from(['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', '"\x01"', '"\\x"']))
key_json = st.one_of(st.text(max_size=3).map(json.dumps), st.sampled_from(['"dtype"', '"shape"', '"\\ud800"']))
any_json = st.one_of(
    st.recursive(scalar_json, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(key_json, inner), max_size=3).map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}")),
        max_leaves=6),
    st.integers(120, 130).map(lambda d: "[" * d + "]" * d))


NUMPY_DTYPES = [d for d in ALL_DTYPES if not d.startswith("F8") and d != "F4"]
BIG_DIMS = ["4294967296", "2305843009213693951", "2305843009213693952", "9223372036854775807",
            "9223372036854775808", "18446744073709551615"]
clean_json = st.recursive(st.one_of(st.integers(0, 2**64 - 1).map(str), st.text(max_size=3).map(json.dumps),
                                    st.sampled_from(["null", "true", "-0", "1e-400", "-2.5"])),
                          lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
                          max_leaves=4)


def dim_json(noisy: bool):
    bad = ["-1", "-0", "2.0", "1e0", "true", '"2"', "null", "18446744073709551616"] if noisy else []
    return st.one_of(st.integers(0, 3).map(str), st.integers(0, 3).map(str), st.sampled_from(BIG_DIMS + bad))


@st.composite
def safetensors_case(draw):
    """Bytes of a generated file: clean (every part well-formed, only sizes and layout varying) or
    noisy (any part may be malformed); see the comment above."""
    noisy = draw(st.booleans())
    name = st.one_of(st.sampled_from(["a", "b", "c", "__metadata__"] if noisy else ["a", "b", "c"]),
                     st.text(max_size=3))
    names = draw(st.lists(name, max_size=4, unique=not noisy or draw(st.integers(0, 3)) > 0))
    entries, offset = [], 0
    for name in names:
        dtype = draw(st.sampled_from([*ALL_DTYPES, "X", "f32"] if noisy else NUMPY_DTYPES))
        dims = draw(st.lists(dim_json(noisy), max_size=3))
        ints = [int(d) for d in dims if d.isdigit()]
        nbytes = None
        if len(ints) == len(dims) and dtype in ALL_DTYPES:
            size = 0 if 0 in ints else ALL_DTYPES[dtype] * float(np.prod([float(d) for d in ints]))
            nbytes = int(size) if size <= 4096 else None
        how = draw(st.sampled_from(["tile", "tile", "tile", "shift", "swap", "any"] if noisy else ["tile"]))
        if how == "tile" and nbytes is not None:
            offsets = f"[{offset},{offset + nbytes}]"
            offset += nbytes
        elif how == "shift" and nbytes is not None:
            begin = max(offset + draw(st.integers(-2, 2)), 0)
            offsets = f"[{begin},{begin + nbytes}]"
            offset = begin + nbytes
        elif how == "swap":
            offsets = f"[{offset + 4},{offset}]"
        else:
            offsets = draw(st.one_of(any_json, st.lists(dim_json(noisy), max_size=3).map(lambda d: "[" + ",".join(d) + "]")))
        dtype_text = draw(st.sampled_from([json.dumps(dtype), json.dumps(dtype), '{"%s":null}' % dtype]))
        if noisy and draw(st.integers(0, 9)) == 0:
            dtype_text = draw(any_json)
        fields = {"dtype": dtype_text, "shape": "[" + ",".join(dims) + "]", "data_offsets": offsets}
        form = draw(st.sampled_from(["object", "object", "object", "list"] + (["missing", "any"] if noisy else [])))
        if form == "list":
            body = "[" + ",".join(fields.values()) + "]"
        elif form == "any":
            body = draw(any_json)
        else:
            if form == "missing":
                del fields[draw(st.sampled_from(list(fields)))]
            items = [f'"{k}":{v}' for k, v in fields.items()]
            extra_key = key_json if noisy else st.sampled_from(['"x"', '"y"'])
            items += [f"{k}:{v}" for k, v in dict(draw(st.lists(st.tuples(extra_key, any_json if noisy else clean_json),
                                                                 max_size=2))).items()]
            body = "{" + ",".join(draw(st.permutations(items))) + "}"
        entries.append(f"{json.dumps(name)}:{body}")
    strings = st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2).map(json.dumps)
    metadata = draw(st.one_of(st.none(), st.just("null"), strings, *([any_json] if noisy else [])))
    if metadata is not None:
        entries.insert(draw(st.integers(0, len(entries))), f'"__metadata__":{metadata}')
    space = st.sampled_from(["", "", "", " ", "\n\t\r "] + (["\x0c", "\x00", "\u00a0"] if noisy else []))
    text = draw(space) + "{" + ",".join(draw(st.permutations(entries))) + "}" + draw(space)
    header = text.encode("utf-8", "surrogatepass")
    data_len = max(offset + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 3] if noisy else [0])), 0)
    kind = draw(st.sampled_from(["none"] * 6 + ["flip", "insert", "cut", "length"] if noisy else ["none"]))
    length = len(header)
    if kind != "none" and header:
        pos = draw(st.integers(0, len(header) - 1))
        if kind == "flip":
            header = header[:pos] + bytes([draw(st.integers(0, 255))]) + header[pos + 1:]
        elif kind == "insert":
            header = header[:pos] + bytes([draw(st.integers(0, 255))]) + header[pos:]
        elif kind == "cut":
            header = header[:pos]
        length = len(header) + (draw(st.sampled_from([-1, 1, 2**63])) if kind == "length" else 0)
    data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(data_len)
    return struct.pack("<Q", length % 2**64) + header + data


def reference_read(blob: bytes):
    """The reference package's verdict: None (rejected) or {name: array}.

    `safetensors.numpy.load` is `_view2np(deserialize(blob))`; its NumPy half is applied here to
    every tensor but BF16, which it has no NumPy type for and which is read as float32 bits.
    """
    from safetensors import SafetensorError, deserialize
    from safetensors.numpy import _view2np
    try:
        flat = deserialize(blob)
    except SafetensorError:
        return None
    try:
        out = _view2np([(k, v) for k, v in flat if v["dtype"] != "BF16"])
        for name, v in flat:
            if v["dtype"] == "BF16":
                bits = np.frombuffer(v["data"], "<u2").reshape(v["shape"]).astype(np.uint32)
                out[name] = (bits << 16).view(np.float32)
    except (KeyError, ValueError):  # a dtype or a shape NumPy has no array for
        return None
    return out


def has_duplicate_key(blob: bytes) -> bool:
    def hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise KeyError
        return dict(pairs)
    try:
        json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]].decode("utf-8"), object_pairs_hook=hook)
    except KeyError:
        return True
    except Exception:  # not JSON Python can read: no key to speak of
        return False
    return False


def compare_with_reference(path, blob) -> tuple[bool, bool]:
    """Check our reader against the reference on one file; return (reference accepted, we accepted)."""
    from safetensors import safe_open
    with open(path, "wb") as f:
        f.write(blob)
    theirs = reference_read(blob)
    t0 = time.process_time()  # CPU time: other processes on a busy machine do not count
    try:
        with SafetensorsFile(path) as f:
            ours = {name: f.get(name) for name in f.keys()}
            metadata = f.metadata
    except SafetensorsError as e:
        assert str(e).startswith(str(path) + ": "), e
        ours = None
    assert time.process_time() - t0 < 0.5
    if has_duplicate_key(blob):
        assert ours is None, "a duplicate key must be rejected"
    else:
        assert (ours is None) == (theirs is None), f"reference {'accepts' if theirs is not None else 'rejects'}"
    if ours is not None and theirs is not None:
        assert ours.keys() == theirs.keys()
        for name, arr in ours.items():
            assert arr.dtype == theirs[name].dtype and arr.shape == theirs[name].shape, name
            assert arr.tobytes() == theirs[name].tobytes(), name
        with safe_open(str(path), framework="numpy") as f:
            assert metadata == (f.metadata() or {})
    return theirs is not None, ours is not None


@settings(max_examples=200)  # explicit, whatever the profile: the oracle comparison is this test's point
@given(safetensors_case())
def test_fuzz_verdict_matches_reference_reader(tmp_path_factory, blob):
    pytest.importorskip("safetensors", reason="the reference package (test extra) is the oracle: pip install safetensors")
    compare_with_reference(tmp_path_factory.mktemp("st") / "f.safetensors", blob)


REFERENCE_CASES = [  # (header, data): corner cases of the reference reader, each checked both ways
    ('{"t":["F32",[2],[0,8]]}', 8), ('{"t":["F32",[2],[0,8],1]}', 8), ('{"t":{"dtype":{"F32":null,"F16":null},'
     '"shape":[2],"data_offsets":[0,8]}}', 8), ('{"t":{"dtype":{}, "shape":[2],"data_offsets":[0,8]}}', 8),
    ("{" + E + ',"x":' + "[" * 125 + "]" * 125 + "}}", 8), ("{" + E + ',"x":' + "[" * 126 + "]" * 126 + "}}", 8),
    ("{" + E + ',"x":' + '{"a":' * 125 + "1" + "}" * 125 + "}}", 8), ("{" + E + ',"x":1' + "0" * 300 + "}}", 8),
    ("{" + E + ',"x":1' + "0" * 400 + "}}", 8), ("{" + E + ',"x":-0}}', 8), ("{" + E + ',"x":"\\ud83d"}}', 8),
    ('{"t":{"dtype":"U8","shape":[0,9223372036854775807],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"F32","shape":[0,2305843009213693951],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"F32","shape":[0,2305843009213693952],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}', 0),
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', 0),
    ('{"t":{"dtype":"F32","shape":[0],"data_offsets":[1,1]}}', 1), ('{"t":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', 4),
    ('{"t":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', 8), ('{"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', 1),
    ('{"\\u005f_metadata__":{"a":"b"}}', 0), ('{"__metadata__":{"a":null}}', 0), ("{}", 0), ("{}", 1), (" {} ", 0),
    ("{}\x00", 0), ("\ufeff{}", 0), ("\x0c{}", 0), ("", 0),
]


@pytest.mark.parametrize("header, data_len", REFERENCE_CASES)
def test_reference_corner_cases(tmp_path, header, data_len):
    pytest.importorskip("safetensors", reason="the reference package (test extra) is the oracle: pip install safetensors")
    raw = header.encode()
    compare_with_reference(tmp_path / "c.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(data_len))


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(SafetensorsError, match="complex128"):
        save_file({"c": np.zeros(2, complex)}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsError, match="metadata"):
        save_file({}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(SafetensorsError, match="invalid tensor name"):
        save_file({"__metadata__": np.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsError, match="unknown dtype"):
        save_file({"a": np.zeros(1)}, tmp_path / "x.safetensors", dtypes={"a": "F8"})
    assert not os.listdir(tmp_path)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = good_file(tmp_path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_file({"new": np.zeros(3)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["good.safetensors"]  # no temp file left behind


def test_no_pickle_in_package():
    import tinysft.io as pkg
    for root, _, files in os.walk(os.path.dirname(pkg.__file__)):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name)).read()
                assert not re.search(r"^\s*(import|from)\s+(pickle|joblib)|allow_pickle|np\.load\(", text, re.MULTILINE), name


# --------------------------------------------------------------------------- real model file and reference library


def minilm_expected_shapes():
    shapes = {
        "embeddings.word_embeddings.weight": (30522, 384), "embeddings.position_embeddings.weight": (512, 384),
        "embeddings.token_type_embeddings.weight": (2, 384), "embeddings.position_ids": (1, 512),
        "embeddings.LayerNorm.weight": (384,), "embeddings.LayerNorm.bias": (384,),
        "pooler.dense.weight": (384, 384), "pooler.dense.bias": (384,),
    }
    for i in range(6):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (384, 384), (384,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (1536, 384), (1536,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (384, 1536), (384,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (384,), (384,)
    return shapes


def test_reads_minilm(minilm_dir, tmp_path):
    path = os.path.join(minilm_dir, "model.safetensors")
    tensors = load_file(path)
    expected = minilm_expected_shapes()
    assert len(tensors) == 104 == len(expected)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert tensors["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(tensors["embeddings.position_ids"][0], np.arange(512))
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for k, v in tensors.items() if k != "embeddings.position_ids")
    assert sum(v.size for v in tensors.values()) - 512 == 22_713_216
    with SafetensorsFile(path) as f:  # lazy read equals the memory-mapped one
        np.testing.assert_array_equal(f.get("encoder.layer.5.output.dense.weight"),
                                      tensors["encoder.layer.5.output.dense.weight"])
    save_file(tensors, tmp_path / "copy.safetensors")
    copy = load_file(tmp_path / "copy.safetensors", mmap=False)
    assert all(np.array_equal(copy[k], tensors[k]) for k in tensors)


def test_interop_with_reference_library(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy", reason="reference library absent: pip install safetensors")
    tensors = {"f": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
               "i": np.arange(5, dtype=np.int64), "b": np.array([True, False]), "s": np.array(2.5),
               "e": np.zeros((0, 3), np.float16)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"who": "tinysft"})
    theirs = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(theirs[k], v) and theirs[k].shape == v.shape for k, v in tensors.items())
    st_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"who": "reference"})
    ours = load_file(tmp_path / "theirs.safetensors")
    assert all(np.array_equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in tensors.items())
