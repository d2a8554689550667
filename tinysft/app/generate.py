"""``tinysft generate PROMPT``: one reply of a causal decoder, streamed as it is decoded.

The prompt is a user turn in the model's chat template (ChatML, with the system prompt of
``--system``); ``--raw`` feeds it as it is. The reply's text goes to stdout piece by piece,
then a line on stderr says how many tokens came out and how fast:

    $ tinysft generate "What is the capital of France?"
    The capital of France is Paris.
    [8 tokens in 0.4 s: 20.1 tokens/s after a 37-token prompt in 0.3 s]

``load_decoder`` (shared with ``tinysft chat``) finds the model and its tokenizer: the packaged
SmolLM2-135M-Instruct by default, a ``.gguf`` file (its own tokenizer), or a folder with a
Hugging Face ``config.json`` + ``model.safetensors``, such as a ``tinysft sft`` run folder. A
folder's tokenizer is ``--tokenizer`` (a GGUF file), else the one ``.gguf`` file in the folder
(a run's export), else the packaged SmolLM2's; its vocabulary must be the model's.
"""
import sys
import time
from pathlib import Path

import numpy as np

from ..data.bpe import BPETokenizer
from ..data.chat import render_chatml
from ..models import LlamaForCausalLM, ModelNotFoundError, default_stop_ids, generate, package_gguf
from ..models.locate import SMOLLM2_INSTALL_HINT
from .output import say


def decoder_paths(model: str = "auto", tokenizer: str = "auto") -> tuple:
    """(model path, tokenizer GGUF path) that ``--model`` and ``--tokenizer`` stand for."""
    if model == "auto":
        model = package_gguf()
        if model is None:
            raise ModelNotFoundError(f"SmolLM2-135M-Instruct not found offline: run {SMOLLM2_INSTALL_HINT}")
    path = Path(model).expanduser()
    if not path.exists() and (path.suffix == ".gguf" or str(model).startswith(("/", ".", "~"))):
        raise ModelNotFoundError(f"model not found: {path}")  # a path, not a hub name
    if tokenizer == "auto":
        tokenizer = path if path.is_file() else _folder_gguf(path)
        if tokenizer is None:
            raise ModelNotFoundError(f"{path} has no tokenizer of its own: pass --tokenizer FILE.gguf "
                                     f"(or install SmolLM2's: {SMOLLM2_INSTALL_HINT})")
    return path, Path(tokenizer).expanduser()


def load_decoder(model: str = "auto", tokenizer: str = "auto"):
    """(LlamaForCausalLM in eval mode, BPETokenizer) for ``--model`` and ``--tokenizer``."""
    path, tokenizer = decoder_paths(model, tokenizer)
    decoder = LlamaForCausalLM.from_pretrained(path)
    bpe = BPETokenizer.from_gguf(tokenizer)
    if bpe.vocab_size != decoder.config.vocab_size:
        raise ValueError(f"the tokenizer of {tokenizer} has {bpe.vocab_size:,} tokens but the model {path} "
                         f"{decoder.config.vocab_size:,}: pass the model's own tokenizer with --tokenizer")
    return decoder, bpe


def _folder_gguf(folder: Path):
    """The one ``.gguf`` file in ``folder``, else the packaged SmolLM2's (None if not installed)."""
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else package_gguf()


def reply(model, tokenizer, prompt_ids, config, generator, write) -> dict:
    """Decode one reply to ``prompt_ids``, passing its text to ``write(piece)`` as it comes.

    Returns the new ids (the stop token, if one came, removed), and the timings: ``first``
    seconds to the first new token (the prompt's forward), ``seconds`` in all.
    """
    context = model.config.max_position_embeddings
    if len(prompt_ids) + config.max_new_tokens > context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens and max_new_tokens {config.max_new_tokens}: "
                         f"more than the model's context of {context} tokens")
    stops = default_stop_ids(model, tokenizer)
    started, first = time.perf_counter(), []

    def stream(piece):
        if not first:
            first.append(time.perf_counter())
        write(piece)

    ids = generate(model, [prompt_ids], config.max_new_tokens, temperature=config.temperature,
                   top_k=config.top_k, top_p=config.top_p, generator=generator, stop_ids=stops,
                   tokenizer=tokenizer, stream=stream)[0]
    seconds = time.perf_counter() - started
    stopped = bool(ids) and ids[-1] in stops
    return {"ids": ids[:-1] if stopped else ids, "tokens": len(ids), "stopped": stopped,
            "prompt_tokens": len(prompt_ids), "seconds": seconds,
            "first": (first[0] - started) if first else seconds}


def rate_line(stats: dict) -> str:
    """``[8 tokens in 0.4 s: 20.1 tokens/s after a 37-token prompt in 0.3 s]``: the decode rate
    counts the tokens after the first over the time after it (the prompt's forward excluded)."""
    decoded, after = stats["tokens"] - 1, stats["seconds"] - stats["first"]
    rate = f"{decoded / after:.1f} tokens/s" if decoded > 0 and after > 0 else "rate n/a"
    return (f"[{stats['tokens']} tokens in {stats['seconds']:.1f} s: {rate} after a "
            f"{stats['prompt_tokens']}-token prompt in {stats['first']:.1f} s]")


def seeded_generator(seed: int):
    """The sampling generator of a command: its own, so a seed gives the same text every time."""
    return np.random.default_rng(seed)


def generate_command(prompt: str, config) -> int:
    """``tinysft generate``: print the reply to ``prompt``, then its rate on stderr."""
    model, tokenizer = load_decoder(config.model, config.tokenizer)
    text = prompt if config.raw else render_chatml(
        [{"role": "system", "content": config.system}, {"role": "user", "content": prompt}],
        add_generation_prompt=True)
    stats = reply(model, tokenizer, tokenizer.encode(text), config, seeded_generator(config.seed),
                  lambda piece: print(piece, end="", flush=True))
    say("")
    print(rate_line(stats), file=sys.stderr, flush=True)
    return 0
