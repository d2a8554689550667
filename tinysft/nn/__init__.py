"""Neural-network building blocks with PyTorch's names: Module, Parameter, layers, attention, transformer."""
from ..functional import gelu
from .attention import (MultiHeadSelfAttention, SelfAttention, attention_bias, scaled_dot_product_attention,
                        scaled_masked_softmax)
from .layers import (GELU, MLP, Dropout, Embedding, Identity, LayerNorm, Linear, ReLU, SublayerOutput, Tanh,
                     activation)
from .module import (IncompatibleKeys, Module, ModuleList, Parameter, Sequential, StateDictError,
                     swap_parameters)
from .transformer import (POOLINGS, ClassificationHead, Intermediate, Pooler, TransformerEncoder,
                          TransformerEncoderLayer, cls_pool, l2_normalize, mean_pool)

__all__ = [
    "GELU", "MLP", "POOLINGS", "ClassificationHead", "Dropout", "Embedding", "Identity", "IncompatibleKeys",
    "Intermediate", "LayerNorm", "Linear", "Module", "ModuleList", "MultiHeadSelfAttention", "Parameter", "Pooler",
    "ReLU", "SelfAttention", "Sequential", "StateDictError", "SublayerOutput", "Tanh", "TransformerEncoder",
    "TransformerEncoderLayer", "activation", "attention_bias", "cls_pool", "gelu", "l2_normalize", "mean_pool",
    "scaled_dot_product_attention", "scaled_masked_softmax", "swap_parameters",
]
