"""Neural-network modules with PyTorch's names: Module, Parameter, layers, attention, transformer,
the Llama-family decoder blocks and LoRA.

Modules only: the functions they call (and every fused backward) are in ``tinysft.functional``.
"""
from .attention import AttentionSublayer, MultiHeadAttention
from .decoder import DecoderLayer, GroupedQueryAttention, RMSNorm, SwiGLUMLP
from .layers import (GELU, MLP, Dropout, Embedding, Identity, LayerNorm, Linear, ReLU, SublayerOutput, Tanh,
                     activation)
from .lora import LoRALinear, LoRASummary, apply_lora, lora_layers, merge_and_unload, merge_lora, unmerge_lora
from .module import (IncompatibleKeys, Module, ModuleList, Parameter, Sequential, StateDictError,
                     swap_parameters)
from .transformer import POOLINGS, ClassificationHead, Intermediate, Pooler, TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "GELU", "MLP", "POOLINGS", "AttentionSublayer", "ClassificationHead", "Dropout", "Embedding", "Identity",
    "IncompatibleKeys", "Intermediate", "LayerNorm", "Linear", "Module", "ModuleList", "MultiHeadAttention",
    "Parameter", "Pooler", "ReLU", "Sequential", "StateDictError", "SublayerOutput", "Tanh", "TransformerEncoder",
    "TransformerEncoderLayer", "activation", "swap_parameters",
    "DecoderLayer", "GroupedQueryAttention", "RMSNorm", "SwiGLUMLP",
    "LoRALinear", "LoRASummary", "apply_lora", "lora_layers", "merge_and_unload", "merge_lora", "unmerge_lora",
]
