"""Text generation for causal decoders: a preallocated KV cache, left-padded batches, greedy or
sampled decoding, stop tokens per sequence, and text streamed as it is decoded.

    >>> model, tok = LlamaForCausalLM.from_pretrained(), BPETokenizer.from_gguf(package_gguf())
    >>> ids = tok.encode(render_chatml([{"role": "user", "content": "What is the capital of France?"}],
    ...                                add_generation_prompt=True))
    >>> tok.decode(generate(model, [ids], max_new_tokens=32, stop_ids=default_stop_ids(model, tok))[0])
    'The capital of France is Paris.<|im_end|>'

Decoding is one forward of the prompts (prefill), then one forward of one token per step. With
the cache, each layer's keys and values for every position so far sit in a buffer allocated
once, (B, Hkv, max_length, Dh); a step writes its one new position and attends over the filled
part, so no step recomputes or copies the past. Without it (``use_cache=False``) every step
runs the whole sequence again; both give the same tokens.

Prompts of different lengths are left-padded into one (B, T) batch: the attention mask hides
the pads and the model counts positions from each row's first real token, so a row's tokens
are those it would get alone. Sampling, in Hugging Face's order on the last logits z:
    z / temperature → keep the top_k largest → keep the smallest set of most likely tokens whose
    probability reaches top_p → sample from softmax of what is kept (temperature 0: argmax).
"""
import numpy as np

from ..rng import generator as default_generator
from ..tensor import Tensor, no_grad


class LayerKV:
    """One layer's slot of a KV cache: keys and values (B, Hkv, capacity, Dh), filled up to ``length``."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, xp=np):
        self.keys = xp.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)
        self.values = np.zeros_like(self.keys)
        self.length = 0

    def append(self, k: Tensor, v: Tensor):
        """Write T new positions (B, Hkv, T, Dh) after the filled ones; return every filled
        position's keys and values (B, Hkv, length, Dh), views of the buffers."""
        if k.requires_grad or v.requires_grad:
            raise RuntimeError("the KV cache is for inference: run the model under no_grad() to use it")
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache full: {end} positions for a capacity of {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = k.data
        self.values[:, :, self.length:end] = v.data
        self.length = end
        return Tensor(self.keys[:, :, :end]), Tensor(self.values[:, :, :end])


class KVCache:
    """A LayerKV per decoder layer (``layers[i]``); ``length`` is the number of cached positions.
    ``xp``: the array module of the model's device (NumPy, or CuPy for a model on the GPU)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype=np.float32, xp=np):
        self.layers = [LayerKV(batch, kv_heads, capacity, head_dim, dtype, xp) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        """A cache shaped for ``model`` (a LlamaForCausalLM or anything with its ``config``)."""
        config, weight = model.config, model.output_weight
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim,
                   weight.dtype, weight.xp)

    @property
    def length(self) -> int:
        return self.layers[0].length


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator=None) -> np.ndarray:
    """One token id per row of ``logits`` (B, V): argmax when temperature is 0, else a sample
    after temperature, top-k and top-p (see the module docstring) from ``generator``."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature ≥ 0, top_k ≥ 0 and 0 < top_p ≤ 1; "
                         f"got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature  # (B, V)
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)  # (B, 1)
        z[z < kth] = -np.inf
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")  # most likely first
        ranked = np.take_along_axis(p, order, axis=-1)
        ranked[np.cumsum(ranked, axis=-1) - ranked >= top_p] = 0  # the mass before it already reaches top_p
        p = np.zeros_like(p)
        np.put_along_axis(p, order, ranked, axis=-1)
        p /= p.sum(axis=-1, keepdims=True)
    u = (generator or default_generator("cpu")).random((p.shape[0], 1))  # (B, 1) uniform in [0, 1)
    return np.minimum((np.cumsum(p, axis=-1) <= u).sum(axis=-1), p.shape[-1] - 1)


class TextStream:
    """Feeds the text of generated token ids to ``callback(piece)`` as they come.

    A character whose UTF-8 bytes are split over several tokens (emoji, CJK) is held back until
    it is complete: ids wait while their text ends in an incomplete sequence (U+FFFD), at most
    four ids (the longest UTF-8 sequence), so the pieces always join to the full decode.
    """

    def __init__(self, tokenizer, callback):
        self.tokenizer, self.callback = tokenizer, callback
        self.pending = []

    def put(self, token_id: int) -> None:
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) >= 4:
            self._emit(text)

    def end(self) -> None:
        if self.pending:
            self._emit(self.tokenizer.decode(self.pending))

    def _emit(self, text: str) -> None:
        self.pending = []
        if text:
            self.callback(text)


def default_stop_ids(model, tokenizer=None) -> set:
    """The model's eos id, plus ``<|im_end|>`` and ``<|endoftext|>`` when the tokenizer has them."""
    stops = {model.config.eos_token_id} - {None}
    for token in ("<|im_end|>", "<|endoftext|>"):
        try:
            stops.add(tokenizer.token_to_id(token))
        except (AttributeError, KeyError):
            pass
    return stops


def generate(model, prompts, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator=None, stop_ids=None, use_cache: bool = True, tokenizer=None,
             stream=None) -> list:
    """New token ids for each prompt (a list of token-id lists, any lengths), under no_grad.

    A sequence ends at a token in ``stop_ids`` (kept as its last id; default: the model's eos)
    or after ``max_new_tokens``. ``generator``: a NumPy Generator for sampling (default:
    tinysft's seeded CPU generator). ``stream(piece)``, with ``tokenizer``, receives the text of a
    single prompt's new tokens as they are decoded (stop tokens are not streamed).
    """
    rows = [[int(i) for i in p] for p in prompts]
    if not rows or not all(rows):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if stream is not None and (tokenizer is None or len(rows) != 1):
        raise ValueError("stream needs a tokenizer and a single prompt")
    stops = {model.config.eos_token_id} - {None} if stop_ids is None else set(stop_ids)
    stops = np.array(sorted(stops), dtype=np.int64)
    config = model.config
    pad = next(i for i in (config.pad_token_id, config.eos_token_id, 0) if i is not None)
    batch, prompt_length = len(rows), max(map(len, rows))
    capacity = prompt_length + max_new_tokens
    ids = np.full((batch, capacity), pad, dtype=np.int64)  # left-padded prompts, then new ids
    mask = np.zeros((batch, capacity), dtype=np.int64)  # 1 = a real token
    for i, row in enumerate(rows):
        ids[i, prompt_length - len(row):prompt_length] = row
        mask[i, prompt_length - len(row):] = 1
    cache = KVCache.for_model(model, batch, capacity) if use_cache else None
    text = TextStream(tokenizer, stream) if stream is not None else None
    new = [[] for _ in rows]
    done = np.zeros(batch, dtype=bool)
    length = prompt_length
    with no_grad():
        while length < capacity and not done.all():
            start = 0 if cache is None else cache.length  # the positions not yet in the cache
            logits = model(ids[:, start:length], mask[:, :length], kv_cache=cache, logits_to_keep=1)  # (B, 1, V)
            token = sample_next(logits.numpy()[:, -1], temperature, top_k, top_p, generator)  # (B,)
            token[done] = pad  # finished rows run on, on padding
            for i in np.flatnonzero(~done):
                new[i].append(int(token[i]))
            if text is not None and not done[0] and token[0] not in stops:
                text.put(token[0])
            done |= np.isin(token, stops)
            ids[:, length] = token
            length += 1
    if text is not None:
        text.end()
    return new


__all__ = ["KVCache", "LayerKV", "TextStream", "default_stop_ids", "generate", "sample_next"]
