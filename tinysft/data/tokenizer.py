"""BERT WordPiece tokenizer, from scratch, matching Hugging Face's `tokenizer.json` for BERT.

Pipeline (same order as the reference `BertNormalizer` + `BertPreTokenizer` + `WordPiece`):
1. special tokens ([CLS], [SEP], ...) written literally in the text are kept whole;
2. clean: drop NUL, U+FFFD and control, format, private-use and surrogate characters (Unicode
   Cc, Cf, Co, Cs; unassigned Cn is kept); tab, newline and CR count as whitespace;
   whitespace (Unicode Z*) becomes a space;
3. put spaces around CJK ideographs, so each becomes its own word;
4. strip accents (NFD, drop Mn marks) when `strip_accents` is True, or None and `lowercase`;
5. lowercase, character by character (no context-dependent final sigma);
6. split on whitespace, then split off every punctuation character
   (ASCII 33-47, 58-64, 91-96, 123-126 and Unicode P*);
7. greedy longest-match-first WordPiece with "##" continuations; a word longer than
   100 characters, or one that cannot be covered by the vocabulary, becomes [UNK].

    >>> tok = WordPieceTokenizer.from_dir(model_dir)
    >>> tok.tokenize("Héllo, unaffable world!")
    ['hello', ',', 'una', '##ffa', '##ble', 'world', '!']
    >>> batch = tok(["a short one", "and a somewhat longer sentence"], max_length=16)
    >>> batch["input_ids"].shape, batch["attention_mask"].dtype
    ((2, 7), dtype('int64'))
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["WordPieceTokenizer"]

# CJK Unified Ideographs blocks and extensions, as in the reference tokenizer.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)
_DROP, _SPACE, _CJK, _KEEP = range(4)


@functools.cache
def _char_kind(c: str) -> int:
    """How the cleaning step treats one character."""
    if c in "\t\n\r":
        return _SPACE
    cat = unicodedata.category(c)
    if c in "\x00\ufffd" or cat in ("Cc", "Cf", "Co", "Cs"):  # unassigned (Cn) characters are kept
        return _DROP
    if cat[0] == "Z":
        return _SPACE
    cp = ord(c)
    if any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
        return _CJK
    return _KEEP


@functools.cache
def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(c)[0] == "P"


class WordPieceTokenizer:
    """Uncased (by default) BERT tokenizer over a `vocab.txt` vocabulary."""

    def __init__(self, vocab: Sequence[str], lowercase: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, max_input_chars_per_word: int = 100,
                 unk_token: str = "[UNK]", cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 pad_token: str = "[PAD]", mask_token: str = "[MASK]", model_max_length: int = 512):
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.id_to_token = list(vocab)
        missing = [t for t in (unk_token, cls_token, sep_token, pad_token) if t not in self.vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.max_input_chars_per_word = max_input_chars_per_word
        self.unk_token, self.cls_token, self.sep_token, self.pad_token = unk_token, cls_token, sep_token, pad_token
        self.unk_id, self.cls_id, self.sep_id, self.pad_id = (self.vocab[t] for t in (unk_token, cls_token,
                                                                                      sep_token, pad_token))
        self.model_max_length = model_max_length
        specials = [t for t in (unk_token, cls_token, sep_token, pad_token, mask_token) if t in self.vocab]
        self.special_tokens = frozenset(specials)
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self._wordpiece = functools.lru_cache(maxsize=1 << 16)(self._wordpiece_uncached)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides) -> WordPieceTokenizer:
        """Load `vocab.txt`, and `tokenizer_config.json` settings when present, from a model folder."""
        with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        options = {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            names = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                     "tokenize_chinese_chars": "tokenize_chinese_chars", "model_max_length": "model_max_length"}
            options = {ours: config[theirs] for theirs, ours in names.items() if theirs in config}
        return cls(vocab, **{**options, **overrides})

    def __len__(self) -> int:
        return len(self.id_to_token)

    # ------------------------------------------------------------------ text -> tokens

    def normalize(self, text: str) -> str:
        """Steps 2-5: clean, space out CJK, strip accents, lowercase."""
        out = []
        for c in text:
            kind = _char_kind(c)
            if kind == _KEEP:
                out.append(c)
            elif kind == _SPACE:
                out.append(" ")
            elif kind == _CJK:
                out.append(f" {c} " if self.tokenize_chinese_chars else c)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            # str.lower() would turn a word-final capital sigma into final sigma; the reference does not.
            text = "".join(c.lower() for c in text) if "\u03a3" in text else text.lower()
        return text

    def pre_tokenize(self, normalized: str) -> list[str]:
        """Step 6: split a normalized string into words and single punctuation characters."""
        words = []
        for chunk in normalized.split():
            if chunk.isalnum():
                words.append(chunk)
                continue
            start = 0
            for i, c in enumerate(chunk):
                if _is_punctuation(c):
                    if start < i:
                        words.append(chunk[start:i])
                    words.append(c)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def _wordpiece_uncached(self, word: str) -> tuple[str, ...]:
        """Step 7: greedy longest-match-first split of one word."""
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_token,)
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(piece)
                    start = end
                    break
            else:
                return (self.unk_token,)
        return tuple(pieces)

    def tokenize(self, text: str) -> list[str]:
        """Text to WordPiece tokens, without [CLS]/[SEP]."""
        tokens = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # a special token written in the text
                tokens.append(part)
                continue
            for word in self.pre_tokenize(self.normalize(part)):
                tokens.extend(self._wordpiece(word))
        return tokens

    # ------------------------------------------------------------------ tokens <-> ids

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token[int(i)] for i in ids]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`[CLS] tokens [SEP]` ids, cut to at most `max_length` ids (>= 2) when given."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
            ids = ids[: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = 128, padding: bool | str = True,
                     truncation: bool = True) -> dict[str, np.ndarray]:
        """Encode texts into int64 `input_ids`, `attention_mask`, `token_type_ids` of shape (B, T).

        padding=True pads to the longest sequence, "max_length" to `max_length`; padding=False
        requires equal lengths. truncation=True cuts to `max_length` (default: model_max_length).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode() for one text")
        limit = max_length if max_length is not None else self.model_max_length
        rows = [self.encode(t, limit if truncation else None) for t in texts]
        if padding == "max_length":
            width = max([limit, *map(len, rows)])
        elif padding is True:
            width = max(map(len, rows), default=0)
        elif padding is False:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("sequences differ in length; pass padding=True to pad them")
            width = len(rows[0]) if rows else 0
        else:
            raise ValueError(f"padding must be True, False or 'max_length', got {padding!r}")
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.zeros_like(input_ids)}

    __call__ = encode_batch

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Join tokens back into (normalized) text, merging "##" continuations."""
        text = ""
        for token in self.convert_ids_to_tokens(ids):
            if skip_special_tokens and token in self.special_tokens:
                continue
            text += token[2:] if token.startswith("##") else (" " + token if text else token)
        return text
