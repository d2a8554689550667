"""Layers: Linear, Embedding, LayerNorm, Dropout, activations, MLP, SublayerOutput.

PyTorch names, parameter shapes and initialisation; random initial values come
from ``tinysft.rng`` (``manual_seed`` makes them repeat) or an explicit
``generator``. Shapes are noted on each forward: B batch, T tokens, D features.
"""
import copy
import math

import numpy as np

from .. import functional as F
from ..rng import generator as default_generator
from ..tensor import Tensor
from .module import Module, Parameter, Sequential


def _uniform(shape, bound, generator, dtype):
    rng = generator or default_generator("cpu")
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Linear(Module):
    """y = x Wᵀ + b with W of shape [out_features, in_features] (as PyTorch).

    Initialisation as PyTorch: W, b ~ U(−1/√in, 1/√in) (kaiming_uniform with a=√5).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, generator=None,
                 dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.weight = Parameter(_uniform((out_features, in_features), bound, generator, dtype))
        self.register_parameter("bias", Parameter(_uniform((out_features,), bound, generator, dtype))
                                if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in) -> (..., out); folded to one 2-D GEMM so BLAS sees a single big matrix
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table [num_embeddings, embedding_dim], initialised N(0, 1) as PyTorch.

    ``padding_idx``: that row starts at zero and receives no gradient (its value
    is still used in the forward, as PyTorch does).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, generator=None,
                 dtype=np.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        rng = generator or default_generator("cpu")
        table = rng.standard_normal((num_embeddings, embedding_dim)).astype(dtype)
        if padding_idx is not None:
            table[padding_idx] = 0
        self.weight = Parameter(table)

    def forward(self, ids) -> Tensor:
        # ids: (...) integers -> (..., D)
        return F.embedding(self.weight, ids, self.padding_idx)

    def extra_repr(self):
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class LayerNorm(Module):
    """Normalise over the last axis: (x − μ)/√(σ² + eps) · weight + bias (weight=1, bias=0 at init)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, dtype=np.float32):
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"LayerNorm normalises over the last axis only; got normalized_shape={normalized_shape}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype))
            self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., D) -> (..., D)
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout with probability p while ``training``; the identity in eval mode."""

    def __init__(self, p: float = 0.5, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        # x: (...) -> (...)
        return F.dropout(x, self.p, self.training, self.generator)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    """GELU activation; ``approximate='tanh'`` for the tanh form (HF's gelu_new)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        # x: (...) -> (...)
        return F.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        # x: (...) -> (...)
        return x.relu()


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        # x: (...) -> (...)
        return x.tanh()


class Identity(Module):
    def forward(self, x):
        # x: (...) -> (...)
        return x


ACTIVATIONS = {
    "gelu": lambda: GELU(),
    "gelu_new": lambda: GELU("tanh"),
    "gelu_tanh": lambda: GELU("tanh"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "relu": lambda: ReLU(),
    "tanh": lambda: Tanh(),
}


def activation(name_or_module) -> Module:
    """A Module for an activation name as found in HF configs ('gelu', 'gelu_new', 'relu', 'tanh'),
    a Module class, or the Module itself."""
    if isinstance(name_or_module, Module):
        return name_or_module
    if isinstance(name_or_module, type) and issubclass(name_or_module, Module):
        return name_or_module()
    if name_or_module not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name_or_module!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name_or_module]()


class MLP(Module):
    """Linear → activation → Dropout for each hidden size, then a final Linear.

    ``MLP(384, [256, 128], 10)`` has layers ``layers.0`` (Linear 384→256),
    ``layers.3`` (Linear 256→128), ``layers.6`` (Linear 128→10).
    """

    def __init__(self, in_features: int, hidden_sizes, out_features: int, activation_fn="gelu",
                 dropout: float = 0.0, generator=None):
        super().__init__()
        parts, width = [], in_features
        for hidden in hidden_sizes:
            act = copy.deepcopy(activation_fn) if isinstance(activation_fn, Module) else activation(activation_fn)
            parts += [Linear(width, hidden, generator=generator), act, Dropout(dropout)]
            width = hidden
        parts.append(Linear(width, out_features, generator=generator))
        self.layers = Sequential(*parts)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in) -> (..., out)
        return self.layers(x)


class SublayerOutput(Module):
    """The end of a transformer sub-layer: ``dense`` → ``dropout`` → + residual → ``LayerNorm``.

    HF BERT's BertSelfOutput and BertOutput (names ``dense``, ``LayerNorm``).
    Post-LN (BERT): LN(residual + Drop(dense(h))). Pre-LN (``norm_first``): the
    caller applies ``LayerNorm`` to the sub-layer's input and this returns
    residual + Drop(dense(h)). ``residual=None`` skips the sum and the norm.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, eps: float = 1e-12,
                 norm_first: bool = False, generator=None):
        super().__init__()
        self.norm_first = norm_first
        self.dense = Linear(in_features, out_features, generator=generator)
        self.LayerNorm = LayerNorm(out_features, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, residual=None) -> Tensor:
        # h: (B, T, in), residual: (B, T, out) -> (B, T, out)
        y = self.dropout(self.dense(h))
        if residual is None:
            return y
        y = y + residual
        return y if self.norm_first else self.LayerNorm(y)
