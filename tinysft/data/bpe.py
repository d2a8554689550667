"""Byte-level BPE tokenizer (the GPT-2 family) built from a GGUF file's tokenizer metadata.

Written for SmolLM2's tokenizer (`tokenizer.ggml.model = gpt2`, `tokenizer.ggml.pre = smollm`)
and checked id for id against Hugging Face `tokenizers` built from the same vocabulary and merges.
Pipeline, in the reference's order:

1. added tokens: control tokens (`token_type` 3: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...)
   and user-defined ones (4) written in the text are matched first, leftmost then longest, and
   become one id each; the text between them goes through steps 2-4 piece by piece;
2. pre-tokenize, by `tokenizer.ggml.pre`, with the GPT-2 pattern

       P = 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   `gpt2`: split the text with P. `smollm`: first isolate every \\p{N} character, then split each
   stretch between them with P -- Hugging Face's `Sequence([Digits(individual_digits=True),
   ByteLevel(add_prefix_space=False, use_regex=True)])` from SmolLM2's `tokenizer.json`, which is
   also llama.cpp's `smollm` pre-tokenizer. The two differ only on whitespace before a digit:
   `"x  5"` is `x|␣␣|5` under smollm, `x|␣|␣5` under gpt2 (then `Ġ Ġ 5`, as `Ġ5` is no token);
3. byte level: each piece's UTF-8 bytes, each byte spelled as one printable character
   (GPT-2's `bytes_to_unicode`: `!`..`~`, `¡`..`¬`, `®`..`ÿ` stand for themselves, the other 68
   bytes for U+0100 onwards, so a space is `Ġ` and a newline `Ċ`);
4. BPE: the piece starts as one symbol per byte; the adjacent pair with the lowest merge rank is
   merged first, the leftmost on ties (a heap, as in Hugging Face `tokenizers`), until no pair
   has a merge. A byte with no token of its own is dropped, as the reference does when it has
   no unknown token: for SmolLM2 these are the control characters U+0004, U+0006, U+0013,
   U+0014, U+0016, U+001D, and the lead bytes F1/F2 of code points U+40000..U+BFFFF (all
   unassigned). Every other string comes back unchanged from `decode(encode(s))`.

P without the `regex` package. Each character is mapped (`str.translate`, cached per character)
to the class letter that P distinguishes it by: `L` a letter (Unicode category L*), `N` a number
(N*), `w` whitespace other than U+0020, `o` anything else; U+0020 itself, the apostrophe and the
letters `strevmld` of the contractions stand for themselves. P spelled over that alphabet,

    's|'t|'re|'ve|'m|'ll|'d| ?[Lstrevmld]+| ?N+| ?[o']+|[ w]+(?![^ w])|[ w]+

matches exactly where P matches on the text, so the standard `re` module finds the pieces
(linear time: every alternative backtracks at most one character). `smollm` reads `N` as a
single piece and lets whitespace end before a digit: `... ?[Lstrevmld]+|N| ?[o']+|[ w]+(?![^ wN])|[ w]+`.
Whitespace is the Unicode White_Space property (what the reference's Oniguruma `\\s` matches:
U+0009..U+000D, U+0020, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F,
U+205F, U+3000), not `str.isspace`, which also counts U+001C..U+001F.

Known divergence: letter and number classes come from Python's `unicodedata` (Unicode 14.0 on
Python 3.11), the reference's from its Rust/Oniguruma tables (a newer Unicode). Code points
assigned after Unicode 14.0 are unassigned (class `o`) here, so text using them may split
differently; every character assigned in 14.0 agrees, as far as the tests have seen.

`encode_with_offsets` also gives each token's character span in the text (a token holding part
of a character's bytes covers the whole character); `chat.tokens_in_spans` turns the assistant
spans of a rendered chat into a loss mask with it.

    >>> tok = BPETokenizer.from_gguf(path)                       # SmolLM2-135M-Instruct.Q4_1.gguf
    >>> tok.encode("Hello world!")
    [19556, 905, 17]
    >>> tok.encode_with_offsets("Hello world!")[1]
    [(0, 5), (5, 11), (11, 12)]
    >>> tok.decode(tok.encode("<|im_start|>user\\nhi<|im_end|>"))
    '<|im_start|>user\\nhi<|im_end|>'
    >>> tok.encode_batch(["Hello world!", "hi"], padding_side="left")["attention_mask"]
    array([[1, 1, 1],
           [0, 0, 1]])
"""

from __future__ import annotations

import functools
import heapq
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["BPETokenizer", "bytes_to_unicode"]

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that are matched whole in the text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of each byte as one printable character (byte -> character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + n)
    return spelling


_BYTE_TO_CHAR = bytes_to_unicode()
_UNSPELL = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}  # str.translate: byte character -> latin-1 code point
_ERASE_ALPHABET = dict.fromkeys(_UNSPELL)  # str.translate: what is left is outside the byte alphabet

_WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                   0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))
_KEPT = " 'strevmld"  # characters P names literally stand for themselves


class _CharClasses(dict):
    """`str.translate` table: code point -> the class letter P sees it as, filled on first sight
    (up to 65,536 code points, so hostile text cannot grow it to all 1.1 million)."""

    def __missing__(self, cp: int) -> str:
        c = chr(cp)
        if c in _KEPT:
            kind = c
        elif c in _WHITE_SPACE:
            kind = "w"
        else:
            kind = {"L": "L", "N": "N"}.get(unicodedata.category(c)[0], "o")
        if len(self) < 1 << 16:
            self[cp] = kind
        return kind


_CLASSES = _CharClasses()
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
_SPLIT = {  # P over the class alphabet; see the module docstring
    "gpt2": re.compile(_CONTRACTIONS + r"| ?[Lstrevmld]+| ?N+| ?[o']+|[ w]+(?![^ w])|[ w]+"),
    "smollm": re.compile(_CONTRACTIONS + r"| ?[Lstrevmld]+|N| ?[o']+|[ w]+(?![^ wN])|[ w]+"),
}
PRE_TOKENIZERS = tuple(_SPLIT)


class BPETokenizer:
    """Byte-level BPE over a vocabulary `tokens` (id = position) and `merges` ("left right", best first).

    `token_types` follows llama.cpp (1 normal, 3 control, 4 user-defined, ...): control and
    user-defined tokens are matched whole in the text (step 1); control tokens are the special
    ones, dropped by `decode(..., skip_special_tokens=True)`.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None, *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 unk_id: int | None = None, pre_tokenizer: str = "smollm", add_bos: bool = False,
                 add_eos: bool = False, source: str = "tokenizer"):
        def error(msg: str) -> ValueError:
            return ValueError(f"{source}: {msg}")

        if not isinstance(pre_tokenizer, str) or pre_tokenizer not in _SPLIT:
            raise error(f"pre-tokenizer {pre_tokenizer!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
        tokens = list(tokens)
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token:
                raise error(f"token {i} is {token!r}, not a non-empty string")
        try:
            types = [1] * len(tokens) if token_types is None else [int(t) for t in token_types]
        except (TypeError, ValueError):
            raise error("token types must be a list of integers") from None
        if len(types) != len(tokens):
            raise error(f"{len(types)} token types for {len(tokens)} tokens")
        added = {t for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)}
        # A normal token outside the byte alphabet is respelled from its UTF-8 bytes (as transformers does).
        spelled = [t if t in added or not t.translate(_ERASE_ALPHABET) else _spell(t) for t in tokens]
        self._vocab = {}
        for i, token in enumerate(spelled):
            if self._vocab.setdefault(token, i) != i:
                raise error(f"token {token!r} appears twice (ids {self._vocab[token]} and {i})")
        self._tokens = spelled
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, merge in enumerate(merges):
            parts = merge.split(" ") if isinstance(merge, str) else ()
            if len(parts) != 2 or not all(parts):
                raise error(f"merge {rank} is {merge!r}, not two tokens separated by one space")
            ids = [self._vocab.get(p) for p in (*parts, parts[0] + parts[1])]
            if None in ids:
                raise error(f"merge {rank} ({merge!r}) names a token that is not in the vocabulary")
            self._merges[ids[0], ids[1]] = (rank, ids[2])  # a repeated merge keeps its last rank, as in HF and GPT-2
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < len(tokens)):
                raise error(f"{name} id {value!r} is not an id of the {len(tokens)}-token vocabulary")
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise error("add_bos/add_eos is set but the tokenizer has no bos/eos id")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (None if v is None else int(v)
                                                              for v in (bos_id, eos_id, pad_id, unk_id))
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.pre_tokenizer = pre_tokenizer
        self.special_ids = frozenset(i for i, kind in enumerate(types) if kind == CONTROL)
        self._split = _SPLIT[pre_tokenizer]
        self._added_re = (re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))))
                          if added else None)
        # Bytes each id decodes to: added tokens as written, the rest through the byte alphabet.
        self._bytes = [t.encode("utf-8") if t in added else t.translate(_UNSPELL).encode("latin-1") for t in spelled]
        self._dropped = frozenset(b for b, c in _BYTE_TO_CHAR.items() if c not in self._vocab)
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, object], source: str = "GGUF metadata") -> BPETokenizer:
        """The tokenizer a GGUF file's `tokenizer.ggml.*` keys describe (a dict key -> value, lists for arrays)."""
        def get(key, default=None, required=False):
            if key not in metadata:
                if required:
                    raise ValueError(f"{source}: key {key!r} is missing")
                return default
            return metadata[key]

        model = get("tokenizer.ggml.model", required=True)
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
        tokens, merges = get("tokenizer.ggml.tokens", required=True), get("tokenizer.ggml.merges", required=True)
        for key, value in (("tokens", tokens), ("merges", merges)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{source}: tokenizer.ggml.{key} is a {type(value).__name__}, not a list of strings")
        return cls(tokens, merges, get("tokenizer.ggml.token_type"),
                   bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
                   pad_id=get("tokenizer.ggml.padding_token_id"), unk_id=get("tokenizer.ggml.unknown_token_id"),
                   pre_tokenizer=get("tokenizer.ggml.pre", "gpt2"),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                   add_eos=bool(get("tokenizer.ggml.add_eos_token", False)), source=source)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read the tokenizer from a GGUF file's metadata (the tensors are not read)."""
        from tinysft.io.gguf import GGUFFile

        with GGUFFile(path) as f:
            metadata = f.metadata
        return cls.from_gguf_metadata(metadata, source=os.fspath(path))

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int:
        """The id of a token as the vocabulary spells it (`Ġhello`, `<|im_end|>`)."""
        if token not in self._vocab:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return self._vocab[token]

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[self._check_id(token_id)]

    def _check_id(self, token_id) -> int:
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < len(self._tokens):
            raise ValueError(f"{token_id!r} is not a token id (the vocabulary has {len(self._tokens)})")
        return int(token_id)

    # ------------------------------------------------------------------ text -> ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Step 2 alone (added tokens are not looked for): the pieces BPE sees, before byte spelling."""
        return [text[start:end] for start, end, _ in self._pieces(text, parse_special=False)]

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """Steps 3-4 for one piece: (rank, position)-ordered merges over a linked list of symbols."""
        try:
            spelled = _spell(piece)
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {piece[e.start]!r}, which has no UTF-8 encoding") from None
        vocab, merges = self._vocab, self._merges
        ids = [vocab[c] for c in spelled if c in vocab]  # a byte without a token is dropped
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # nxt == n: no right neighbour
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((ids[i], ids[i + 1])))]
        heapq.heapify(heap)
        while heap:
            _, pos, new = heapq.heappop(heap)
            right = nxt[pos]
            if ids[pos] is None or right == n or merges.get((ids[pos], ids[right]), (0, None))[1] != new:
                continue  # stale: a symbol of this pair was merged since it was pushed
            ids[pos], ids[right] = new, None
            nxt[pos] = nxt[right]
            if nxt[pos] < n:
                prv[nxt[pos]] = pos
            if prv[pos] >= 0 and (m := merges.get((ids[prv[pos]], new))):
                heapq.heappush(heap, (m[0], prv[pos], m[1]))
            if nxt[pos] < n and (m := merges.get((new, ids[nxt[pos]]))):
                heapq.heappush(heap, (m[0], pos, m[1]))
        return tuple(i for i in ids if i is not None)

    def _pieces(self, text: str, parse_special: bool):
        """Steps 1-2: `(start, end, id)` for each added token in `text`, `(start, end, None)` for each
        piece between them, in order."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        start = 0
        matches = self._added_re.finditer(text) if parse_special and self._added_re is not None else ()
        for m in [*matches, None]:
            end = len(text) if m is None else m.start()
            for p in self._split.finditer(text[start:end].translate(_CLASSES)):
                yield start + p.start(), start + p.end(), None
            if m is not None:
                yield m.start(), m.end(), self._vocab[m.group()]
                start = m.end()

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`.

        add_special_tokens: prepend bos / append eos when the metadata asks for it
        (`add_bos_token`, `add_eos_token`; SmolLM2 asks for neither). parse_special=False reads
        `<|im_end|>` and the other added tokens in the text as plain characters (for untrusted text).
        """
        ids = [self.bos_id] if add_special_tokens and self.add_bos else []
        for start, end, added in self._pieces(text, parse_special):
            if added is None:
                ids.extend(self._bpe(text[start:end]))
            else:
                ids.append(added)
        if add_special_tokens and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True,
                            parse_special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """`(ids, offsets)`: `encode`'s ids and, per token, the `(start, end)` characters of `text` it
        covers. A token holding part of a character's bytes covers the whole character (so tokens
        of one emoji may share a span); bos/eos added here cover `(0, 0)` and `(len, len)`."""
        ids, offsets = [], []
        if add_special_tokens and self.add_bos:
            ids.append(self.bos_id)
            offsets.append((0, 0))
        for start, end, added in self._pieces(text, parse_special):
            if added is not None:
                ids.append(added)
                offsets.append((start, end))
                continue
            piece = text[start:end]
            tokens = self._bpe(piece)  # rejects lone surrogates before the encode below
            data = piece.encode("utf-8")
            owner = [start + i for i, c in enumerate(piece) for _ in c.encode("utf-8")]  # byte -> its character
            pos = 0
            for token in tokens:
                while data[pos] in self._dropped:  # bytes BPE dropped cover no token
                    pos += 1
                n = len(self._bytes[token])
                ids.append(token)
                offsets.append((owner[pos], owner[pos + n - 1] + 1))
                pos += n
        if add_special_tokens and self.add_eos:
            ids.append(self.eos_id)
            offsets.append((len(text), len(text)))
        return ids, offsets

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None, padding: bool | str = True,
                     truncation: bool = False, padding_side: str = "right",
                     add_special_tokens: bool = True) -> dict[str, np.ndarray]:
        """Encode texts into int64 `input_ids` and `attention_mask` (B, T) and `lengths` (B,).

        padding=True (or "longest") pads to the longest row, "max_length" to `max_length`, False
        requires equal lengths; pads take `pad_id` and go on `padding_side` ("right" or "left").
        truncation=True keeps the first `max_length` ids of a row; without it a row longer than
        `max_length` is an error. Build masks by position (this `attention_mask`, or `lengths`),
        never by comparing ids with `pad_id`: for SmolLM2 the pad id is also the eos id and
        `<|im_end|>`, which ends every chat turn.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode() for one text")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if max_length is not None:
            if truncation:
                rows = [r[:max_length] for r in rows]
            elif (longest := max(map(len, rows), default=0)) > max_length:
                raise ValueError(f"a text has {longest} tokens, over max_length={max_length}; pass truncation=True")
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if padding == "max_length":
            width = max_length
        elif padding is True or padding == "longest":
            width = int(lengths.max(initial=0))
        elif padding is False:
            if len(set(lengths.tolist())) > 1:
                raise ValueError("texts differ in token count; pass padding=True to pad them")
            width = int(lengths.max(initial=0))
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        if self.pad_id is None and (lengths < width).any():
            raise ValueError("padding needs a pad id, and this tokenizer has none")
        input_ids = np.full((len(rows), width), -1 if self.pad_id is None else self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[i, span] = row
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "lengths": lengths}

    # ------------------------------------------------------------------ ids -> text

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: their bytes joined, then read as UTF-8 (an invalid sequence becomes U+FFFD)."""
        data = [self._bytes[i] for i in map(self._check_id, ids)
                if not (skip_special_tokens and i in self.special_ids)]
        return b"".join(data).decode("utf-8", errors="replace")


def _spell(token: str) -> str:
    """A token's UTF-8 bytes in the byte alphabet."""
    return token.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)  # latin-1: one code point per byte
