"""ChatML rendering, as SmolLM2-Instruct's chat template writes it, without a template engine.

The template (the GGUF key `tokenizer.chat_template`) writes, for messages m_1..m_n,

    [<|im_start|>system\\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\\n]      only when m_1 is not a system message
    <|im_start|>{role}\\n{content}<|im_end|>\\n                       for each message, in order
    [<|im_start|>assistant\\n]                                       when add_generation_prompt

Content is written as it is: no stripping, and `<|im_end|>` inside a message stays in the text
(the tokenizer then reads it as the control token, as the reference does). A system message
after the first is rendered like any other turn.

`render_chatml_with_spans` also gives, for each assistant turn, the character span of its
content plus its closing `<|im_end|>` (not the newline after it): the tokens an assistant-only
loss is taken on. `tokens_in_spans` turns those spans into a token mask, given the character
offsets of each token (`BPETokenizer.encode_with_offsets`):

    >>> text, spans = render_chatml_with_spans(messages)
    >>> ids, offsets = tokenizer.encode_with_offsets(text)
    >>> loss_mask = tokens_in_spans(offsets, spans)           # (T,) bool

A token is in when its first character is. Only a whitespace token can straddle a span's start:
the newline closing `<|im_start|>assistant\\n` joins the reply's leading whitespace when the reply
starts with two or more whitespace characters or is whitespace only (after the header, "\\n  hi"
splits as "\\n ", " hi"), and a token holding both stays out. Nothing straddles a span's end,
which is the `<|im_end|>` token.

    >>> render_chatml([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ...               add_generation_prompt=True)
    '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ROLES", "DEFAULT_SYSTEM_PROMPT", "IM_START", "IM_END", "render_chatml", "render_chatml_with_spans",
           "tokens_in_spans"]

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `[{"role": ..., "content": ...}, ...]`."""
    return render_chatml_with_spans(messages, add_generation_prompt)[0]


def render_chatml_with_spans(messages: Sequence[Mapping[str, str]],
                             add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """`(text, spans)`: the rendered chat and, per assistant turn, `(start, end)` character offsets
    with `text[start:end] == content + "<|im_end|>"`."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message")
    for i, message in enumerate(messages):
        _check_message(i, message)
    parts, spans, size = [], [], 0

    def write(s: str) -> None:
        nonlocal size
        parts.append(s)
        size += len(s)

    if messages[0]["role"] != "system":
        write(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
    for message in messages:
        write(f"{IM_START}{message['role']}\n")
        start = size
        write(message["content"] + IM_END)
        if message["role"] == "assistant":
            spans.append((start, size))
        write("\n")
    if add_generation_prompt:
        write(f"{IM_START}assistant\n")
    return "".join(parts), spans


def tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(T,) bool: token t is in when its first character offsets[t][0] lies in some span [start, end)."""
    starts = np.array([start for start, _ in offsets], dtype=np.int64)  # (T,)
    mask = np.zeros(len(starts), dtype=bool)
    for start, end in spans:
        mask |= (starts >= start) & (starts < end)
    return mask


def _check_message(i: int, message) -> None:
    if not isinstance(message, Mapping):
        raise TypeError(f"message {i} is a {type(message).__name__}, not a {{'role', 'content'}} dict")
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(f"message {i} has no {' or '.join(map(repr, missing))}: {message!r:.200}")
    if message["role"] not in ROLES:
        raise ValueError(f"message {i} has role {message['role']!r}; the roles are {', '.join(ROLES)}")
    if not isinstance(message["content"], str):
        raise TypeError(f"message {i} ({message['role']}) has content of type "
                        f"{type(message['content']).__name__}, not str")
