"""Supervised fine-tuning data for a causal LM: JSONL chats, the WordNet questions, loss masks, packing.

Formats. A JSONL file holds one example per line, all in one of two formats:

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}     chat
    {"prompt": str, "completion": str}                                               prompt/completion

Blank lines are skipped. A row is refused, with `file:line` in a `DatasetError`, when it is
not UTF-8, is longer than `max_line_bytes` (the newline not counted), is not a JSON object,
repeats a key, has a key outside its format (no silent dropping of `"name"`, `"tools"` or a
misspelt key), mixes the two formats (in the row or across the file), has an empty `messages`
list or no assistant turn, an unknown role, a value of the wrong type, or a string holding a
lone surrogate (no UTF-8 form). Reading is linear in the file size and holds one line at a
time: numbers are never converted, and nesting deeper than the JSON parser's limit is a
`DatasetError`, not a `RecursionError`.

Rendering. A chat is rendered by `chat.render_chatml` (the default system prompt is prepended
when the first message is not a system one, as SmolLM2's template does) and tokenized as one
text; a prompt/completion row is the chat [user: prompt, assistant: completion], i.e. the prompt
as a user turn followed by the generation prompt `<|im_start|>assistant\\n`, then the completion
and its `<|im_end|>`.

Masking (`encode_example`). `labels[t] = input_ids[t]` when token t is supervised, else
`IGNORE` (-100); the one-position shift (logits at t predict labels[t + 1]) belongs to the loss.
Supervised tokens, by `train_on`:

- "assistant": each assistant turn's content tokens and its closing `<|im_end|>` (so the model
  learns to stop); never the system, user or `<|im_start|>role\\n` tokens, nor the newline after
  `<|im_end|>`. Which tokens those are comes from character spans (`chat.tokens_in_spans`), never
  from token ids: `<|im_end|>` is also the eos and the pad id (2) in this vocabulary. (A reply
  opening with two or more whitespace characters gives its first one to the header's newline
  token, which stays out: `chat` states the rule.)
- "completion": the last assistant turn only (for a prompt/completion row, the completion: the
  same tokens as "assistant").
- "all": every token.

In every mode token 0 is not supervised (nothing precedes it to predict it from), so the
count of `labels != IGNORE` is exactly the number of predicted tokens, and packing (below)
supervises the same tokens as leaving the examples apart.
`max_length` keeps the first `max_length` tokens. `encode_examples` encodes a list, counts the
truncated examples and drops (and counts) those left with no supervised token.

Packing (`pack_examples`). First-fit decreasing: examples are taken longest first (ties in
input order), each placed in the first row, in opening order, with room for it, else in a new
row; a row holds at most `max_length` tokens. In a row, example k (from 1) has
`segment_ids = k` and `position_ids = 0, 1, ...` (RoPE restarts), and its first label is
`IGNORE`, so its first token is never predicted from the previous example. Every token of
every example lands in exactly one row, in its order; an example longer than `max_length` is
truncated first (and counted), as above.

Collation (`sft_collate`). Right padding to the longest row: `input_ids` take `pad_id`, `labels`
`IGNORE`, `position_ids` 0 and `segment_ids` 0; `attention_mask` is True on the first
`len(row)` positions, decided by position and never by id.

    >>> tok = BPETokenizer.from_gguf(path)                      # SmolLM2-135M-Instruct.Q4_1.gguf
    >>> enc = encode_example(tok, {"prompt": "Hi", "completion": "Hello!"})
    >>> enc["input_ids"][-4:], enc["labels"][-4:]                # "Hello", "!", <|im_end|>, "\\n"
    (array([19556,    17,     2,   198]), array([19556,    17,     2,  -100]))
    >>> render_mask(tok, enc, color=False).splitlines()[-2:]
    ['<|im_start|>assistant', '⟦Hello!<|im_end|>⟧']
    >>> rows = pack_examples([enc, enc], max_length=100)        # both fit one row
    >>> len(rows), rows[0]["segment_ids"][[0, -1]].tolist()
    (1, [1, 2])
    >>> batch = sft_collate(rows, pad_id=tok.pad_id)            # (B, T) arrays, masks by position
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from tinysft.data.chat import ROLES, render_chatml, render_chatml_with_spans, tokens_in_spans
from tinysft.data.datasets import DatasetError
from tinysft.data.wordnet import NOUN_LEXNAMES, find_wordnet_noun_file, parse_synsets
from tinysft.io.bounds import unique_keys_object

__all__ = ["IGNORE", "TRAIN_ON", "KINDS", "read_sft_jsonl", "parse_noun_synsets", "wordnet_sft_splits",
           "encode_example", "encode_prompt", "encode_examples", "pack_examples", "Packed", "sft_collate",
           "render_mask"]

IGNORE = -100  # the label of a token the loss skips (cross_entropy's ignore_index)
TRAIN_ON = ("assistant", "completion", "all")
KINDS = ("category", "definition")
MAX_LINE_BYTES = 1 << 24

_FORMATS = {"chat": ("messages",), "prompt/completion": ("prompt", "completion")}


# ---------------------------------------------------------------------------------------------- JSONL


class _RowError(ValueError):
    """A malformed row; the reader adds the file and line."""


class _Number:
    """What every JSON number decodes to: no example field is a number, and converting a long
    digit string to an int is superlinear."""


_NUMBER = _Number()


def _number(_text: str) -> _Number:
    return _NUMBER


def _kind(value) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", _Number: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _object(pairs: list) -> dict:
    return unique_keys_object(pairs, lambda key: _RowError(f"key {key!r:.80} appears twice in one object"))


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} is {_kind(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _RowError(f"{what} holds a lone surrogate at character {e.start} (no UTF-8 form)") from None
    return value


def _check_keys(obj: dict, allowed: Sequence[str], what: str) -> None:
    extra = [k for k in obj if k not in allowed]
    if extra:
        raise _RowError(f"{what} has unknown key(s) {', '.join(repr(k)[:80] for k in extra[:5])}; "
                        f"the keys are {', '.join(map(repr, allowed))}")


def _row(record) -> tuple[str, dict]:
    """(format, normalised example) of one decoded JSON value, or _RowError."""
    if not isinstance(record, dict):
        raise _RowError(f"expected a JSON object, got {_kind(record)}")
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise _RowError("the row mixes the chat format ('messages') and the prompt/completion format")
    if "messages" in record:
        _check_keys(record, _FORMATS["chat"], "a chat row")
        messages = record["messages"]
        if not isinstance(messages, list):
            raise _RowError(f"'messages' is {_kind(messages)}, not a list")
        if not messages:
            raise _RowError("'messages' is empty")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _RowError(f"message {i} is {_kind(message)}, not an object")
            _check_keys(message, ("role", "content"), f"message {i}")
            for key in ("role", "content"):
                if key not in message:
                    raise _RowError(f"message {i} has no {key!r}")
            role = _string(message["role"], f"message {i}'s role")
            if role not in ROLES:
                raise _RowError(f"message {i} has role {role!r:.80}; the roles are {', '.join(ROLES)}")
            out.append({"role": role, "content": _string(message["content"], f"message {i}'s content")})
        if not any(m["role"] == "assistant" for m in out):
            raise _RowError("the conversation has no assistant turn (nothing to train on)")
        return "chat", {"messages": out}
    if "prompt" in record or "completion" in record:
        _check_keys(record, _FORMATS["prompt/completion"], "a prompt/completion row")
        missing = [k for k in _FORMATS["prompt/completion"] if k not in record]
        if missing:
            raise _RowError(f"a prompt/completion row has no {missing[0]!r}")
        return "prompt/completion", {k: _string(record[k], repr(k)) for k in _FORMATS["prompt/completion"]}
    raise _RowError(f"expected 'messages' (chat) or 'prompt' and 'completion'; the row has keys "
                    f"{', '.join(repr(k)[:80] for k in list(record)[:5]) or 'none'}")


def read_sft_jsonl(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> list[dict]:
    """The examples of a chat or prompt/completion JSONL file (see the module docstring for the rules).

    Each example is `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`;
    any malformed row raises `DatasetError("FILE:LINE: ...")`.
    """
    path = os.fspath(path)
    if not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be a positive int, got {max_line_bytes!r}")
    decoder = json.JSONDecoder(object_pairs_hook=_object, parse_int=_number, parse_float=_number,
                               parse_constant=_number)
    examples, first = [], None  # first: (format, line) of the first example
    with open(path, "rb") as f:
        line_num = 0
        while raw := f.readline(max_line_bytes + 1):
            line_num += 1
            where = f"{path}:{line_num}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DatasetError(f"{where}: the line is longer than {max_line_bytes} bytes")
            if line_num == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                fmt, example = _row(decoder.decode(line))
            except RecursionError:
                raise DatasetError(f"{where}: JSON nested too deeply") from None
            except _RowError as e:
                raise DatasetError(f"{where}: {e}") from None
            except ValueError as e:  # json.JSONDecodeError
                raise DatasetError(f"{where}: invalid JSON: {e}") from None
            if first is None:
                first = (fmt, line_num)
            elif fmt != first[0]:
                raise DatasetError(f"{where}: a {fmt} row in a file of {first[0]} rows (line {first[1]}); "
                                   f"use one format per file")
            examples.append(example)
    if not examples:
        raise DatasetError(f"{path}: no examples found")
    return examples


# ---------------------------------------------------------------------------------------------- WordNet


def parse_noun_synsets(path: str | os.PathLike | None = None) -> list[dict]:
    """Every synset of WordNet's `data.noun` (`tinysft.data.wordnet.parse_synsets`), in file order:
    `{"offset", "lemmas", "lexname", "gloss", "definition"}` (the gloss's first definition: see
    `wordnet_sft_splits`)."""
    return [{"offset": s.offset, "lemmas": s.lemmas, "lexname": NOUN_LEXNAMES[s.label], "gloss": s.gloss,
             "definition": _definition(s.gloss)} for s in parse_synsets(find_wordnet_noun_file(path))]


_CUT = re.compile(r'[;"]')


def _definition(gloss: str) -> str:
    """The first definition of a gloss: the text before the first `;` or `"` outside parentheses
    (WordNet writes `definition; another; "example"`)."""
    for cut in _CUT.finditer(gloss):
        before = gloss[:cut.start()]
        if before.count("(") <= before.count(")"):
            return before.strip()
    return gloss.strip()


def _question(kind: str, synset: dict) -> tuple[str, str]:
    word, definition = synset["lemmas"][0].replace("_", " "), synset["definition"]
    if kind == "category":
        return (f"Which WordNet category does '{word}' (meaning: {definition}) belong to?",
                synset["lexname"].removeprefix("noun."))
    return f"What does '{word}' mean?", definition


def _lemma_groups(synsets: list[dict]) -> list[list[int]]:
    """Indices of `synsets` grouped so that synsets sharing a lemma (case-insensitively) share a
    group: the components of union-find over "has lemma w", in order of first member."""
    parent = list(range(len(synsets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, synset in enumerate(synsets):
        for lemma in synset["lemmas"]:
            j = owner.setdefault(lemma.lower(), i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(synsets)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def wordnet_sft_splits(max_examples: int | None = None, seed: int = 0, kinds: Sequence[str] = KINDS,
                       fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                       path: str | os.PathLike | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) chat examples made from WordNet's noun synsets.

    Each synset with a non-empty first definition gives one example per kind, in `kinds` order:

    - "category": user "Which WordNet category does 'X' (meaning: D) belong to?", assistant: its
      lexicographer file without "noun." (`animal`, `artifact`, ..., `Tops`: 26 answers);
    - "definition": user "What does 'X' mean?", assistant: D;

    X is the synset's first lemma (underscores as spaces), D the gloss's first definition (the
    text before the first `;` or example outside parentheses). Each example is
    `{"messages", "kind", "answer", "synset"}` (`synset`: the data.noun offset).

    Split by synset, leaking no lemma: synsets sharing any lemma (case-insensitively) are joined
    into groups (union-find), the groups are shuffled by `seed`, and each in turn goes to test
    while test holds fewer than `fractions[2]` of the synsets and it fits, else to validation
    likewise, else to train (so the large groups of very polysemous words go to train). All
    82,115 noun synsets of WordNet 3.0 form 56,441 groups, the largest of 12,344 synsets, and
    split into 65,691 / 8,212 / 8,212 synsets (×2 examples with both kinds) for seed 0.
    `max_examples` first draws `max_examples // len(kinds)` synsets at random by `seed`, so the
    three splits hold at most `max_examples` examples in all, about 80/10/10. Deterministic
    for a seed.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds!r}")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not abs(sum(fractions) - 1) < 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    rng = np.random.default_rng(seed)
    synsets = [s for s in parse_noun_synsets(path) if s["definition"]]
    if max_examples is not None:
        count = max_examples // len(kinds)
        if count < 1:
            raise ValueError(f"max_examples={max_examples} is fewer than one synset's {len(kinds)} examples")
        if count < len(synsets):
            synsets = [synsets[i] for i in np.sort(rng.choice(len(synsets), count, replace=False))]
    groups = _lemma_groups(synsets)
    targets = [round(fractions[2] * len(synsets)), round(fractions[1] * len(synsets))]  # test, validation
    test, validation, train = [], [], []
    for g in rng.permutation(len(groups)):
        group = groups[g]
        for split, target in zip((test, validation), targets):
            if len(split) + len(group) <= target:
                split.extend(group)
                break
        else:
            train.extend(group)

    def examples(indices: list[int]) -> list[dict]:
        out = []
        for i in indices:
            for kind in kinds:
                question, answer = _question(kind, synsets[i])
                out.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}],
                            "kind": kind, "answer": answer, "synset": synsets[i]["offset"]})
        return out

    return examples(train), examples(validation), examples(test)


# ---------------------------------------------------------------------------------------------- masks


def _messages(example: Mapping) -> list[dict]:
    if not isinstance(example, Mapping):
        raise TypeError(f"an example is a dict with 'messages' or 'prompt'/'completion', got {type(example).__name__}")
    if "messages" in example:
        return list(example["messages"])
    if "prompt" in example and "completion" in example:
        return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    raise ValueError(f"an example needs 'messages' or 'prompt' and 'completion'; got keys {list(example)}")


def _check_max_length(max_length) -> None:
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")


def encode_example(tokenizer, example: Mapping, train_on: str = "assistant",
                   max_length: int | None = None) -> dict[str, np.ndarray]:
    """`{"input_ids", "labels"}`, int64 (T,), of one chat or prompt/completion example; the
    masking rules are the module docstring's. Truncation keeps the first `max_length` tokens."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    _check_max_length(max_length)
    text, spans = render_chatml_with_spans(_messages(example))
    ids, offsets = tokenizer.encode_with_offsets(text)
    if train_on == "all":
        supervised = np.ones(len(ids), dtype=bool)
    else:
        supervised = tokens_in_spans(offsets, spans if train_on == "assistant" else spans[-1:])  # (T,)
    supervised[:1] = False  # token 0 is predicted from nothing
    input_ids = np.asarray(ids, dtype=np.int64)  # (T,)
    labels = np.where(supervised, input_ids, IGNORE)  # (T,)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer, example: Mapping) -> np.ndarray:
    """int64 (T,): the ids a model answers the example's last assistant turn from, i.e. the
    messages before that turn rendered with the generation prompt `<|im_start|>assistant\\n`
    (for a prompt/completion row: the prompt as a user turn, then the generation prompt)."""
    messages = _messages(example)
    last = max((i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"),
               default=None)
    if not last:
        raise ValueError("an example to answer needs an assistant turn after at least one other message")
    return np.asarray(tokenizer.encode(render_chatml(messages[:last], add_generation_prompt=True)), dtype=np.int64)


def encode_examples(tokenizer, examples: Sequence[Mapping], train_on: str = "assistant",
                    max_length: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """`(encoded, counts)`: `encode_example` of each example, less those that have no supervised
    token left after truncation; counts = {"truncated": examples cut to max_length,
    "dropped": examples left out for having no supervised token}."""
    encoded, counts = [], {"truncated": 0, "dropped": 0}
    for example in examples:
        enc = encode_example(tokenizer, example, train_on)
        enc, keep = _truncate(enc, max_length, counts)
        if keep:
            encoded.append(enc)
    return encoded, counts


def _truncate(enc: Mapping, max_length: int | None, counts: dict[str, int]) -> tuple[dict, bool]:
    """(enc cut to max_length, whether it still has a supervised token), counting both events."""
    input_ids, labels = np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["labels"], dtype=np.int64)
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise ValueError(f"an encoded example has input_ids {input_ids.shape} and labels {labels.shape}; "
                         f"both must be (T,)")
    if max_length is not None and len(input_ids) > max_length:
        counts["truncated"] += 1
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    keep = bool((labels[1:] != IGNORE).any())
    counts["dropped"] += not keep
    return {"input_ids": input_ids, "labels": labels}, keep


# ---------------------------------------------------------------------------------------------- packing


class Packed(list):
    """`pack_examples`' rows (a list of dicts), with `truncated` and `dropped` counts."""

    truncated: int = 0
    dropped: int = 0


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the items (indices into `lengths`) of each row, rows in opening order.

    A max-tree over row slots holds each slot's free room (unopened slots: `capacity`), so the
    leftmost slot with room ≥ L is found in O(log n): a fresh slot is just the first unopened one.
    """
    n = len(lengths)
    size = 1 << max(n - 1, 0).bit_length()
    room = [capacity] * (2 * size)  # room[size + r]: free tokens of row r; room[k] = max of children
    rows: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):  # stable: ties keep input order
        k = 1
        while k < size:  # descend to the leftmost leaf with room
            k = 2 * k if room[2 * k] >= lengths[i] else 2 * k + 1
        row = k - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        room[k] -= lengths[i]
        while k > 1:
            k //= 2
            room[k] = max(room[2 * k], room[2 * k + 1])
    return rows


def pack_examples(encoded: Sequence[Mapping], max_length: int) -> Packed:
    """Rows of at most `max_length` tokens, each `{"input_ids", "labels", "position_ids",
    "segment_ids"}` int64 (L,), by first-fit decreasing (module docstring). Examples longer than
    `max_length` are truncated and counted (`rows.truncated`); those then left with no
    supervised token are dropped and counted (`rows.dropped`)."""
    _check_max_length(max_length)
    if max_length is None:
        raise ValueError("pack_examples needs max_length")
    counts = {"truncated": 0, "dropped": 0}
    kept = [enc for enc, keep in (_truncate(e, max_length, counts) for e in encoded) if keep]
    rows = Packed()
    rows.truncated, rows.dropped = counts["truncated"], counts["dropped"]
    for members in _first_fit([len(e["input_ids"]) for e in kept], max_length):
        parts = [kept[i] for i in members]
        labels = np.concatenate([p["labels"] for p in parts])  # (L,)
        starts = np.cumsum([0] + [len(p["input_ids"]) for p in parts[:-1]])
        labels[starts] = IGNORE  # no example's first token is predicted from the one before
        rows.append({"input_ids": np.concatenate([p["input_ids"] for p in parts]), "labels": labels,
                     "position_ids": np.concatenate([np.arange(len(p["input_ids"])) for p in parts]),
                     "segment_ids": np.concatenate([np.full(len(p["input_ids"]), k + 1)
                                                    for k, p in enumerate(parts)])})
    return rows


def sft_collate(items: Sequence[Mapping], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad encoded examples or packed rows into a batch of (B, T) arrays: `input_ids`,
    `labels`, `attention_mask` (bool, by position), `position_ids`, and `segment_ids` when the
    items are packed rows (all or none of them)."""
    if not items:
        raise ValueError("sft_collate needs at least one item")
    if not isinstance(pad_id, (int, np.integer)) or isinstance(pad_id, bool):
        raise TypeError(f"pad_id must be an int, got {pad_id!r}")
    packed = {"segment_ids" in item for item in items}
    if len(packed) > 1:
        raise ValueError("a batch mixes packed rows (with segment_ids) and unpacked examples")
    packed = packed.pop()
    lengths = [len(item["input_ids"]) for item in items]
    b, t = len(items), max(lengths)
    batch = {"input_ids": np.full((b, t), pad_id, dtype=np.int64), "labels": np.full((b, t), IGNORE, dtype=np.int64),
             "attention_mask": np.arange(t)[None, :] < np.array(lengths)[:, None],  # (B, T)
             "position_ids": np.zeros((b, t), dtype=np.int64)}
    if packed:
        batch["segment_ids"] = np.zeros((b, t), dtype=np.int64)
    for r, (item, n) in enumerate(zip(items, lengths)):
        batch["input_ids"][r, :n] = item["input_ids"]
        batch["labels"][r, :n] = item["labels"]
        batch["position_ids"][r, :n] = item["position_ids"] if packed else np.arange(n)
        if packed:
            batch["segment_ids"][r, :n] = item["segment_ids"]
    return batch


# ---------------------------------------------------------------------------------------------- display

_COLORS = {True: "\x1b[1;32m", False: "\x1b[2m"}  # trained: bold green; ignored: dim
_RESET = "\x1b[0m"
_MARKERS = ("⟦", "⟧")


def render_mask(tokenizer, enc: Mapping, color: bool | None = None) -> str:
    """The decoded example with its trained tokens (labels ≠ IGNORE) and ignored ones told apart:
    in two ANSI colours (trained bold green, ignored dim) or, with `color=False`, trained runs
    between ⟦ and ⟧. `color=None` picks colours when standard output is a terminal and
    `NO_COLOR` is unset. Each run of like tokens is decoded as one (a run boundary inside a
    multi-byte character shows U+FFFD)."""
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    ids = [int(i) for i in enc["input_ids"]]
    trained = (np.asarray(enc["labels"]) != IGNORE).tolist()
    if len(trained) != len(ids):
        raise ValueError(f"{len(ids)} input ids but {len(trained)} labels")
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end])
            if color:
                out.append(_COLORS[trained[start]] + text + _RESET)
            else:
                out.append(text.join(_MARKERS) if trained[start] else text)
            start = end
    return "".join(out)
