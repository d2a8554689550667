"""Export a Llama-family decoder for other runtimes: a Hugging Face folder and a GGUF file.

    save_pretrained(model, folder)        config.json + model.safetensors, float32, HF names:
                                          what transformers' LlamaForCausalLM.from_pretrained reads
    export_gguf(model, path, tokenizer_metadata(source), "Q8_0")
                                          one GGUF v3 file for llama.cpp-style runtimes

The GGUF file holds what llama.cpp's loader asks of a ``llama`` model: ``general.architecture``,
``general.file_type`` (0 all F32, 1 mostly F16, 7 mostly Q8_0), the ``llama.*`` shape keys with
the types its converter writes (counts UINT32, ε and the RoPE base FLOAT32), the tokenizer keys
(``tokenizer.ggml.*`` and ``tokenizer.chat_template``, copied with their types from the GGUF the
model came from), and the tensors under GGUF names. 2-D weights are stored as ``dtype`` (F16 or
Q8_0, or F32), the norm weights as F32 (what the converter does: they are tiny and
precision-sensitive). The rows of every Q and K projection are permuted back to the rotary
layout GGUF uses (``permute_rotary_rows``), the inverse of what loading undoes.

Error of a round trip (export, then load the file back), per weight w of a block of 32:
F16 rounds to 11 significant bits, |Δw| ≤ 2⁻¹¹·|w|; Q8_0 stores q = round(w/d), d = max|w_block|/127,
and d as float16, so |Δw| ≤ d/2 + |q|·|fp16(d) − d| ≤ (1/2 + 127·2⁻¹¹)·d: about 0.44% of the block's
largest weight.

A model with LoRA adapters must be merged first (``nn.lora.merge_and_unload``): both formats
hold plain weights only.
"""
from pathlib import Path

import numpy as np

from ..io.gguf import VALUE_TYPES, GGUFFile, write_gguf
from ..nn.lora import lora_layers
from .llama import GGUF_BLOCK_TO_HF, GGUF_TO_HF, permute_rotary_rows

__all__ = ["FILE_TYPES", "GGUF_DTYPES", "export_gguf", "gguf_metadata", "save_pretrained", "tokenizer_metadata"]

GGUF_DTYPES = ("F32", "F16", "Q8_0")  # what the 2-D weights may be stored as
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}  # llama.cpp's general.file_type (LLAMA_FTYPE_ALL_F32, ...)
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION: the block layouts written here
_HF_TO_GGUF = {hf: gguf for gguf, hf in GGUF_TO_HF.items()}
_HF_BLOCK_TO_GGUF = {hf: gguf for gguf, hf in GGUF_BLOCK_TO_HF.items()}


def _check_plain(model) -> None:
    adapters = lora_layers(model)
    if adapters:
        raise ValueError(f"the model still has {len(adapters)} LoRA adapters ({adapters[0][0]}, ...): "
                         "merge them first (tinysft.nn.lora.merge_and_unload) to export plain weights")


def save_pretrained(model, folder) -> Path:
    """``config.json`` + ``model.safetensors`` in ``folder`` (a plain, merged model); see
    ``LlamaForCausalLM.save_pretrained``."""
    _check_plain(model)
    return model.save_pretrained(folder)


def hf_to_gguf_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (the inverse of ``gguf_to_hf_name``)."""
    if name in _HF_TO_GGUF:
        return _HF_TO_GGUF[name]
    parts = name.split(".")  # model . layers . i . <module> . <leaf> . weight
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight" or module not in _HF_BLOCK_TO_GGUF:
        raise ValueError(f"{name} has no GGUF counterpart")
    return f"blk.{parts[2]}.{_HF_BLOCK_TO_GGUF[module]}.weight"


def tokenizer_metadata(gguf_path) -> dict:
    """The tokenizer keys of a GGUF file (``tokenizer.*``), each value typed as the file stores it
    (a NumPy scalar of its GGUF type), so ``write_gguf`` writes them back with the same types."""
    with GGUFFile(gguf_path) as f:
        return {key: _typed(value, f.metadata_types[key]) for key, value in f.metadata.items()
                if key.startswith("tokenizer.")}


def _typed(value, gguf_type: str):
    """A metadata value as ``write_gguf`` must see it to write ``gguf_type``: numeric scalars as
    NumPy scalars of that type; strings, bools and arrays (which keep their dtype) as they are."""
    if gguf_type in ("STRING", "BOOL") or gguf_type.startswith("ARRAY"):
        return value
    dtype = next(d for name, d in VALUE_TYPES.values() if name == gguf_type)
    return dtype.type(value)


def gguf_metadata(config, dtype: str = "Q8_0", name: str = "tinysft export") -> dict:
    """``general.*`` and ``llama.*`` keys for a model of ``config`` (a LlamaConfig), typed as
    llama.cpp's converter writes them."""
    u32, f32 = np.uint32, np.float32
    metadata = {
        "general.architecture": "llama", "general.name": name, "general.file_type": u32(FILE_TYPES[dtype]),
        "llama.vocab_size": u32(config.vocab_size),
        "llama.context_length": u32(config.max_position_embeddings),
        "llama.embedding_length": u32(config.hidden_size),
        "llama.block_count": u32(config.num_hidden_layers),
        "llama.feed_forward_length": u32(config.intermediate_size),
        "llama.attention.head_count": u32(config.num_attention_heads),
        "llama.attention.head_count_kv": u32(config.num_key_value_heads),
        "llama.rope.dimension_count": u32(config.head_dim),
        "llama.rope.freq_base": f32(config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
    }
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        metadata["llama.attention.key_length"] = metadata["llama.attention.value_length"] = u32(config.head_dim)
    if dtype != "F32":
        metadata["general.quantization_version"] = u32(QUANTIZATION_VERSION)
    return metadata


def export_gguf(model, path, tokenizer: dict, dtype: str = "Q8_0", name: str = "tinysft export") -> Path:
    """Write ``model`` (a plain LlamaForCausalLM) as one GGUF file at ``path``.

    ``tokenizer``: the ``tokenizer.*`` metadata to carry (``tokenizer_metadata(source_gguf)``);
    its bos/eos/padding ids are the model's own. ``dtype``: F16 or Q8_0 (or F32) for the 2-D
    weights; 1-D weights (the RMSNorm scales) are F32.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    _check_plain(model)
    config = model.config
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in tokenizer]
    if missing:
        raise ValueError(f"tokenizer metadata lacks {', '.join(missing)} (use tokenizer_metadata(source.gguf))")
    if len(tokenizer["tokenizer.ggml.tokens"]) != config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer['tokenizer.ggml.tokens']):,} tokens but the model "
                         f"{config.vocab_size:,}")
    metadata = {**gguf_metadata(config, dtype, name), **tokenizer}
    for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("padding", config.pad_token_id)):
        if value is not None:
            metadata[f"tokenizer.ggml.{key}_token_id"] = np.uint32(value)

    rotary = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}  # heads per projection
    tensors, types = {}, {}
    for hf_name, param in model.named_parameters():
        weight = np.asarray(param.numpy(), dtype=np.float32)
        projection = hf_name.split(".")[-2]
        if projection in rotary:
            weight = permute_rotary_rows(weight, rotary[projection])
        gguf_name = hf_to_gguf_name(hf_name)
        tensors[gguf_name], types[gguf_name] = weight, dtype if weight.ndim == 2 else "F32"
    write_gguf(path, metadata, tensors, types)
    return Path(path)
