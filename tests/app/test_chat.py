"""``tinysft chat`` through ``tinysft.app.cli.main``, its input a monkeypatched stdin.

On a tiny random decoder (tests/app/tiny_decoder.py): every turn's prompt is the whole
conversation so far in the chat template (the replies as they were decoded), ``/reset`` forgets
it, end of input quits with status 0, a conversation too long for the context drops its oldest
exchanges, and a run folder stands for its model. (The packaged SmolLM2's reply is tested
through ``tinysft generate``, which shares ``reply`` with this command.)
"""
import io

import pytest

from tinysft.app import chat as chat_module
from tinysft.app.chat import fit_context
from tinysft.data.chat import DEFAULT_SYSTEM_PROMPT, render_chatml

from .helpers import assert_user_error, run_cli
from .tiny_decoder import write_tiny_decoder


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("decoder"))


def chat_with(monkeypatch, lines: str, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_cli(["chat", *argv])


@pytest.fixture
def chat_prompts(monkeypatch):
    """The prompts (text) and replies of every turn that reaches ``reply``."""
    seen = []
    real = chat_module.reply

    def spy(model, tokenizer, prompt_ids, *args):
        stats = real(model, tokenizer, prompt_ids, *args)
        seen.append((tokenizer.decode(prompt_ids), tokenizer.decode(stats["ids"])))
        return stats

    monkeypatch.setattr(chat_module, "reply", spy)
    return seen


def test_each_turn_sees_the_whole_conversation(monkeypatch, decoder_folder, chat_prompts):
    code, out, err = chat_with(monkeypatch, "first question\n\nsecond one\n", str(decoder_folder),
                               "--max-new-tokens", "8", "--temperature", "1", "--seed", "4")
    assert code == 0, err
    (prompt1, reply1), (prompt2, reply2) = chat_prompts  # the empty line is no turn
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    first = [system, {"role": "user", "content": "first question"}]
    assert prompt1 == render_chatml(first, add_generation_prompt=True)
    assert prompt2 == render_chatml(first + [{"role": "assistant", "content": reply1},
                                             {"role": "user", "content": "second one"}], add_generation_prompt=True)
    assert reply1 in out and reply2 in out and out.startswith("chat with ")
    assert err.count(" tokens in ") == 2  # a rate line per reply


def test_reset_forgets_the_conversation(monkeypatch, decoder_folder, chat_prompts):
    code, out, _ = chat_with(monkeypatch, "one\n/reset\ntwo\n", "--model", str(decoder_folder), "--max-new-tokens", "2",
                             "--system", "Be brief.")
    assert code == 0 and "(conversation forgotten)" in out
    assert chat_prompts[1][0] == render_chatml([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "two"}], add_generation_prompt=True)


def test_a_long_conversation_drops_its_oldest_exchanges(decoder_folder):
    from tinysft.app.generate import load_decoder
    _, tokenizer = load_decoder(str(decoder_folder))
    system = {"role": "system", "content": "s"}
    turns = [{"role": "user", "content": "u" * 50}, {"role": "assistant", "content": "a" * 50},
             {"role": "user", "content": "new"}]
    whole = len(tokenizer.encode(render_chatml([system] + turns, add_generation_prompt=True)))
    assert fit_context(tokenizer, system, list(turns), whole) is not None
    kept = list(turns)
    ids = fit_context(tokenizer, system, kept, whole - 1)
    assert kept == turns[2:] and tokenizer.decode(ids) == render_chatml([system] + kept, add_generation_prompt=True)
    assert fit_context(tokenizer, system, [{"role": "user", "content": "x" * 99}], 20) is None


def test_a_turn_that_cannot_fit_is_skipped_with_a_message(monkeypatch, decoder_folder, chat_prompts):
    code, _, err = chat_with(monkeypatch, "x" * 2000 + "\nshort\n", str(decoder_folder), "--max-new-tokens", "2")
    assert code == 0 and "does not fit the context of 1024 tokens" in err
    assert len(chat_prompts) == 1 and "short" in chat_prompts[0][0] and "xxx" not in chat_prompts[0][0]


def test_refusals(monkeypatch, decoder_folder, tmp_path):
    assert_user_error(chat_with(monkeypatch, "", str(decoder_folder), "--model", str(decoder_folder)),
                      "a run folder or --model, not both")
    assert_user_error(chat_with(monkeypatch, "", str(tmp_path)), "config.json")
    assert_user_error(chat_with(monkeypatch, "", "--top-p", "2"), "top_p = 2.0 (--top-p)")
