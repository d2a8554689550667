"""Pretrained model architectures (HF-compatible names) and offline model lookup."""
from .bert import BertConfig, BertEmbeddings, BertForSequenceClassification, BertModel, hf_state_dict, layer_groups
from .locate import DEFAULT_MODEL, ModelNotFoundError, hf_hub_cache, locate_model, package_model_dir

__all__ = ["DEFAULT_MODEL", "BertConfig", "BertEmbeddings", "BertForSequenceClassification", "BertModel",
           "ModelNotFoundError", "hf_hub_cache", "hf_state_dict", "layer_groups", "locate_model",
           "package_model_dir"]
