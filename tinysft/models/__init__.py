"""Pretrained model architectures (HF-compatible names), generation and offline model lookup."""
from .bert import BertConfig, BertEmbeddings, BertForSequenceClassification, BertModel, hf_state_dict, layer_groups
from .generation import KVCache, TextStream, default_stop_ids, generate, sample_next
from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from .locate import DEFAULT_MODEL, ModelNotFoundError, hf_hub_cache, locate_model, package_gguf, package_model_dir

__all__ = ["DEFAULT_MODEL", "BertConfig", "BertEmbeddings", "BertForSequenceClassification", "BertModel",
           "KVCache", "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "ModelNotFoundError", "TextStream",
           "default_stop_ids", "generate", "hf_hub_cache", "hf_state_dict", "layer_groups", "locate_model",
           "package_gguf", "package_model_dir", "sample_next"]
