"""A tiny random decoder with a byte-level tokenizer, for the generate, chat and sft command tests.

``write_tiny_decoder(folder)`` writes what ``tinysft sft`` writes for a tuned model: a Hugging
Face folder (config.json + model.safetensors) with its GGUF export beside it, ``tiny.gguf``,
which carries the tokenizer. Vocabulary: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``
(control tokens, ids 0-2, eos = 2 as in SmolLM2), then one token per byte and one merge, ``ab``,
so any text encodes to its UTF-8 bytes but for the pairs "ab". The weights are random: its replies are noise, but they come
from the same code path as a real model's.
"""
from pathlib import Path

import numpy as np

from tinysft.data.bpe import bytes_to_unicode
from tinysft.models.export import export_gguf, save_pretrained
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + [bytes_to_unicode()[b] for b in range(256)] + ["ab"]
CONFIG = dict(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tokenizer_metadata() -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": np.array([3] * len(SPECIAL) + [1] * 257, np.int32),
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.add_bos_token": False}


def tiny_decoder(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Random weights; the tied embedding scaled to std 0.1 so the next-token distribution is broad
    (at std 1 each token's own logit |e|² dominates and every sample repeats the last token)."""
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}), generator=np.random.default_rng(seed))
    model.model.embed_tokens.weight.data *= 0.1
    return model.eval()


def write_tiny_decoder(folder: Path, seed: int = 0) -> Path:
    """``folder`` with config.json, model.safetensors and tiny.gguf (F32) of one random tiny decoder."""
    model = tiny_decoder(seed)
    save_pretrained(model, folder)
    export_gguf(model, folder / "tiny.gguf", tokenizer_metadata(), "F32", name="tiny")
    return folder
