import json
import os
import re
import struct
import tempfile

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


# --------------------------------------------------------------------------- corrupt files


def good_file(tmp_path):
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.int64)}, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, match", [
    (b"{not json", b"", "invalid JSON header"),
    (b"\xff\xfe", b"", "invalid JSON header"),
    (b"[1, 2]", b"", "expected a JSON object"),
    (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "t": 1}', b"", "duplicate keys"),
    ({"t": entry(dtype="Q7")}, bytes(8), "'t'.*unknown dtype 'Q7'"),
    ({"t": entry(shape=(-2,))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(shape=(2.0,))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(shape=(True, 2))}, bytes(8), "'t'.*non-negative integers"),
    ({"t": entry(offsets=(0,))}, bytes(8), "'t'.*two integers"),
    ({"t": entry(offsets=(8, 0))}, bytes(8), "'t'.*outside the data buffer"),
    ({"t": entry(offsets=(0, 16))}, bytes(8), "'t'.*outside the data buffer"),
    ({"t": entry(offsets=(0, 12))}, bytes(12), "'t'.*size mismatch"),
    ({"t": entry(shape=(3,))}, bytes(8), "'t'.*size mismatch"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12), "'b'.*overlap tensor 'a'"),
    ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), "'t'.*exactly the keys"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
])
def test_invalid_headers_raise(tmp_path, header, data, match):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=match) as err:
        load_file(path)
    assert "bad.safetensors" in str(err.value)
    assert isinstance(err.value, ValueError)


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
