"""``tinysft chat [RUN_DIR]``: talk to a decoder, one turn after another, the conversation kept.

Each line read is a user turn; the whole conversation so far (system prompt, every user turn
and every reply) is rendered with the chat template and the reply streamed. ``/reset`` forgets
the conversation, end of input (Ctrl-D) quits. When the conversation outgrows the model's
context, the oldest exchanges are dropped (the system prompt and the new turn stay).

With a run folder of ``tinysft sft`` it talks to that run's tuned model (the folder holds the
merged weights as a Hugging Face model, and the tokenizer in its GGUF export); otherwise to
``--model`` (default: SmolLM2-135M-Instruct).
"""
import sys

from ..data.chat import render_chatml
from .generate import load_decoder, rate_line, reply, seeded_generator
from .output import say

RESET = "/reset"


def chat(config, run_dir=None, read_line=input) -> int:
    """The conversation loop; ``read_line(prompt)`` gives one line, EOFError at the end of input."""
    if run_dir is not None and config.model != "auto":
        raise ValueError("give a run folder or --model, not both")
    model, tokenizer = load_decoder(config.model if run_dir is None else run_dir, config.tokenizer)
    say(f"chat with {model.name_or_path} (Ctrl-D quits, {RESET} forgets the conversation)")
    system = {"role": "system", "content": config.system}
    turns, generator = [], seeded_generator(config.seed)
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            say("")
            return 0
        if not line.strip():
            continue
        if line.strip() == RESET:
            turns = []
            say("(conversation forgotten)")
            continue
        turns.append({"role": "user", "content": line})
        prompt = fit_context(tokenizer, system, turns, model.config.max_position_embeddings - config.max_new_tokens)
        if prompt is None:
            turns.pop()
            print(f"tinysft: that message does not fit the context of {model.config.max_position_embeddings} "
                  f"tokens with max_new_tokens {config.max_new_tokens}; try a shorter one", file=sys.stderr)
            continue
        stats = reply(model, tokenizer, prompt, config, generator, lambda piece: print(piece, end="", flush=True))
        say("")
        print(rate_line(stats), file=sys.stderr, flush=True)
        turns.append({"role": "assistant", "content": tokenizer.decode(stats["ids"])})


def fit_context(tokenizer, system: dict, turns: list, budget: int):
    """The token ids of the conversation ready for a reply, at most ``budget`` of them: the oldest
    exchanges are dropped from ``turns`` (in place) until it fits; None if the last turn alone does not."""
    while True:
        ids = tokenizer.encode(render_chatml([system] + turns, add_generation_prompt=True))
        if len(ids) <= budget:
            return ids
        if len(turns) == 1:
            return None
        del turns[:2]  # the oldest user turn and its reply
