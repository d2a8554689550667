import json
import os
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinysft.data.tokenizer import WordPieceTokenizer

# --------------------------------------------------------------------------- a toy vocabulary (always runs)

TOY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "##a", "a", "b", "hello",
             "world", "!", ",", "cafe", "naive", "中", "文", "1", "##2", "'", "s", "##s"]


@pytest.fixture(scope="module")
def toy():
    return WordPieceTokenizer(TOY_VOCAB)


def test_greedy_longest_match_first(toy):
    assert toy.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert toy.tokenize("unaffablex") == ["[UNK]"]  # one uncovered piece makes the whole word unknown
    assert toy.tokenize("aaa") == ["a", "##a", "##a"]


def test_normalization(toy):
    assert toy.tokenize("  Héllo,\tWORLD!! ") == ["hello", ",", "world", "!", "!"]
    assert toy.tokenize("Café naïve") == ["cafe", "naive"]
    assert toy.tokenize("中文a") == ["中", "文", "a"]  # CJK ideographs become single words
    assert toy.tokenize("he\x00l\u200blo\ufffd") == ["hello"]  # NUL, zero-width space (Cf), U+FFFD dropped
    assert toy.tokenize("hello\u3000world\xa0a") == ["hello", "world", "a"]
    assert toy.tokenize("a's") == ["a", "'", "s"]
    assert toy.tokenize("") == [] and toy.tokenize(" \n\t ") == []


def test_long_words_are_unknown(toy):
    assert toy.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert toy.tokenize("a" * 101) == ["[UNK]"]


def test_special_tokens_in_text(toy):
    assert toy.tokenize("hello[SEP]world [MASK]") == ["hello", "[SEP]", "world", "[MASK]"]
    assert "[SEP]" not in toy.tokenize("[sep]")  # special tokens match case-sensitively


def test_encode_and_batch(toy):
    assert toy.encode("hello world") == [2, 11, 12, 3]
    assert toy.encode("hello world hello", max_length=4) == [2, 11, 12, 3]
    batch = toy(["hello", "hello world !"], max_length=16)
    assert batch["input_ids"].tolist() == [[2, 11, 3, 0, 0], [2, 11, 12, 13, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(v.dtype == np.int64 for v in batch.values()) and not batch["token_type_ids"].any()
    assert toy.encode_batch(["hello"], max_length=6, padding="max_length")["input_ids"].shape == (1, 6)
    long = toy.encode_batch(["a " * 50], max_length=8)["input_ids"]
    assert long.shape == (1, 8) and long[0, -1] == 3
    assert toy.encode_batch(["a " * 50], max_length=8, truncation=False)["input_ids"].shape == (1, 52)
    with pytest.raises(ValueError, match="padding=True"):
        toy.encode_batch(["a", "a a"], padding=False)
    with pytest.raises(TypeError):
        toy.encode_batch("hello")


def test_decode(toy):
    assert toy.decode(toy.encode("Unaffable, world!")) == "unaffable , world !"


def test_options():
    cased = WordPieceTokenizer(TOY_VOCAB + ["Hello", "café"], lowercase=False)
    assert cased.tokenize("Hello café") == ["Hello", "café"]
    no_accent_strip = WordPieceTokenizer(TOY_VOCAB + ["café"], strip_accents=False)
    assert no_accent_strip.tokenize("CAFÉ") == ["café"]
    with pytest.raises(ValueError, match="special tokens"):
        WordPieceTokenizer(["a", "b"])


# --------------------------------------------------------------------------- parity with the reference tokenizer


@pytest.fixture(scope="module")
def ours(minilm_dir):
    return WordPieceTokenizer.from_dir(minilm_dir)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    tokenizers = pytest.importorskip("tokenizers", reason="reference absent: pip install tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


TRICKY = [
    "", " ", "Hello, world!", "Héllo Wörld, ça va? Ångström naïve coöperate résumé",
    "中文字符测试 日本語のテキスト 한국어 텍스트 混合mixed文字",
    "Emoji 😀🤗👍🏽 and ❤️ and 🇫🇷 flags",
    "control\x00chars\x01here\x7f\x85 and\x0bvt\x0cff",
    "zero\u200bwidth\u200c\u200djoiner\ufeffbom \ufffd replacement",
    "x" * 120, "supercalifragilistic" * 5 + "ab", "a" * 100, "a" * 101,
    "!!!???...---;;;:::((()))[[[]]]{{{}}}", "“quotes” «guillemets» ‘single’ — dash – en … ellipsis",
    "Numbers: 3.14159, 1,000,000, -42, 1e-10, 0x1F, 2023-11-29, 12:30pm, $9.99, 50%",
    "tabs\tand\nnewlines\r\nand\u2028line\u2029para\u3000ideographic\xa0nbsp",
    "İstanbul ΟΔΟΣ Σ σς ß ẞ Ǆ ǅ ﬁ ½ ² Ⅻ ﾊﾝｶｸ", "e\u0301 vs é, combining\u0327 marks",
    "special [CLS] tokens[SEP]inside [MASK] and [cls] lowercase [UNK]",
    "URL https://example.com/path?q=1&r=2#frag email a.b@c.org @user #hashtag",
    "The quick brown fox jumps over the lazy dog. " * 4,
]


def test_reference_settings_match_our_defaults(minilm_dir, ours):
    with open(os.path.join(minilm_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    norm = spec["normalizer"]
    assert norm == {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                    "strip_accents": None, "lowercase": True}
    assert ours.lowercase and ours.strip_accents and ours.tokenize_chinese_chars  # strip_accents None -> lowercase
    assert spec["pre_tokenizer"]["type"] == "BertPreTokenizer"
    assert spec["model"]["max_input_chars_per_word"] == ours.max_input_chars_per_word == 100
    assert spec["model"]["continuing_subword_prefix"] == "##"
    assert spec["truncation"]["max_length"] == 128  # = our encode_batch default
    assert spec["padding"]["pad_id"] == ours.pad_id == 0
    assert len(ours) == len(spec["model"]["vocab"]) == 30522
    assert all(ours.vocab[t] == i for t, i in spec["model"]["vocab"].items())


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_sentences_match_reference(ours, reference, text):
    expected = reference.encode(text)
    assert ours.encode(text) == expected.ids, (ours.tokenize(text), expected.tokens)


def test_batch_matches_reference_padding_and_truncation(minilm_dir, ours):
    tokenizers = pytest.importorskip("tokenizers", reason="reference absent: pip install tokenizers")
    ref = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))  # pads/truncates to 128
    texts = TRICKY + ["word " * 300]
    got = ours(texts, max_length=128, padding="max_length")
    want = ref.encode_batch(texts)
    np.testing.assert_array_equal(got["input_ids"], [e.ids for e in want])
    np.testing.assert_array_equal(got["attention_mask"], [e.attention_mask for e in want])
    np.testing.assert_array_equal(got["token_type_ids"], [e.type_ids for e in want])


# The reference's character tables predate Python's Unicode 14 database: about 500 code points
# added or re-categorised since (rare scripts' marks and punctuation) tokenize differently.
# Random text is therefore drawn from code points whose category is unchanged since Unicode 3.2.
_OLD = unicodedata.ucd_3_2_0
_STABLE = [chr(c) for c in range(0x30000)  # planes 0-2: all scripts, symbols and CJK
           if not 0xD800 <= c <= 0xDFFF and _OLD.category(chr(c)) == unicodedata.category(chr(c)) != "Cn"]
_unicode_text = st.text(st.one_of(st.characters(max_codepoint=0x7F), st.sampled_from(_STABLE),
                                  st.sampled_from(" \t\n\u3000\u200b\u0301éÉ中,.!'")), max_size=60)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_unicode_text)
def test_random_unicode_matches_reference(ours, reference, text):
    assert ours.encode(text) == reference.encode(text).ids


def test_every_stable_code_point_matches_reference(ours, reference):
    """Each stable code point, between letters, in texts of 64 code points."""
    texts = [" ".join(f"a{c}B" for c in _STABLE[i:i + 64]) for i in range(0, len(_STABLE), 64)]
    got = [ours.encode(t) for t in texts]
    want = [e.ids for e in reference.encode_batch(texts)]
    mismatched = [t for t, g, w in zip(texts, got, want) if g != w]
    assert not mismatched, mismatched[:3]
