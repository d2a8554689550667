"""Generation: sampling rules, per-sequence stopping, streaming text, argument errors.

The SmolLM2 parity of greedy decoding (and cache/no-cache, batch/per-prompt agreement) is in
test_llama.py; these run on tiny random models and hand-made logits.
"""
import numpy as np
import pytest

from tinysft.models.generation import TextStream, generate, sample_next
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(LlamaConfig(**TINY), generator=np.random.default_rng(3))
    return model.astype(np.float64).eval()


def frequencies(logits, draws=20000, seed=0, **options):
    rows = np.repeat(np.asarray(logits, dtype=np.float64)[None], draws, axis=0)  # (draws, V)
    picks = sample_next(rows, generator=np.random.default_rng(seed), **options)
    return np.bincount(picks, minlength=rows.shape[1]) / draws


def assert_close_to(freq, want, draws=20000):
    # each frequency within 5 binomial standard deviations (a false alarm about once in 10⁶)
    sigma = np.sqrt(np.maximum(np.asarray(want) * (1 - np.asarray(want)), 1e-12) / draws)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12), (freq, want)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(sample_next(logits), [1, 0])
    np.testing.assert_array_equal(sample_next(logits, temperature=1.0, top_k=1), [1, 0])
    np.testing.assert_array_equal(sample_next(logits, temperature=5.0, top_p=1e-6), [1, 0])


def test_temperature_sampling_follows_the_softmax():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert_close_to(frequencies(logits, temperature=1.0), [0.5, 0.3, 0.15, 0.05])
    tempered = np.array([0.5, 0.3, 0.15, 0.05]) ** 2  # temperature ½ squares the probabilities
    assert_close_to(frequencies(logits, temperature=0.5), tempered / tempered.sum())


def test_top_k_and_top_p_keep_the_stated_sets():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert_close_to(frequencies(logits, temperature=1.0, top_k=2), [0.625, 0.375, 0, 0])  # 0.5, 0.3 renormalised
    # top_p 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it; 0.9: the first three
    assert_close_to(frequencies(logits, temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0])
    assert_close_to(frequencies(logits, temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert_close_to(frequencies(logits, temperature=1.0, top_k=3, top_p=0.7), [0.625, 0.375, 0, 0])


def test_sampling_repeats_with_the_seed():
    logits = np.random.default_rng(1).standard_normal((4, 50))
    first = [sample_next(logits, 1.0, generator=np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(*first)
    draws = {tuple(sample_next(logits, 1.0, generator=np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1


def test_sampling_arguments_are_checked():
    for options in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="temperature"):
            sample_next(np.zeros((1, 3)), **options)


def test_each_sequence_stops_at_its_own_stop_token(tiny):
    prompts = [[3, 4, 5], [7, 1]]
    free = generate(tiny, prompts, 8, stop_ids=[])
    assert [len(row) for row in free] == [8, 8]
    stop = free[0][1]  # each row ends at its first `stop` (row 0 by its second token), kept as its last
    stopped = generate(tiny, prompts, 8, stop_ids=[stop])
    for row, full in zip(stopped, free):
        assert row == full[:full.index(stop) + 1 if stop in full else 8]
    assert len(stopped[0]) <= 2


def test_seeded_sampled_generation_repeats(tiny):
    def run(seed):
        return generate(tiny, [[2, 3]], 12, temperature=1.5, top_k=5, top_p=0.95, stop_ids=[],
                        generator=np.random.default_rng(seed))
    assert run(0) == run(0)
    assert len({tuple(run(s)[0]) for s in range(6)}) > 1


class ByteTokenizer:
    """Token id = one byte, the way a byte-level BPE spells a character it never merged."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_holds_back_split_characters():
    text = "héllo 東京🙂!"
    pieces = []
    stream = TextStream(ByteTokenizer(), pieces.append)
    for byte in text.encode("utf-8"):
        stream.put(byte)
    stream.end()
    assert "".join(pieces) == text
    assert "🙂" in pieces and "東" in pieces and "\ufffd" not in "".join(pieces)


def test_stream_passes_invalid_bytes_on_as_the_full_decode_does():
    data = [0xFF, 0xFE, 0x41, 0xE6, 0x9D]  # two invalid bytes, "A", then a truncated 3-byte sequence
    pieces = []
    stream = TextStream(ByteTokenizer(), pieces.append)
    for byte in data:
        stream.put(byte)
    stream.end()
    assert "".join(pieces) == ByteTokenizer().decode(data)


def test_generate_arguments_are_checked(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(tiny, [], 3)
    with pytest.raises(ValueError, match="single prompt"):
        generate(tiny, [[1], [2]], 3, tokenizer=ByteTokenizer(), stream=print)
