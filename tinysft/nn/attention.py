"""Multi-head self-attention with a padding mask, laid out as Hugging Face's BERT.

    scores = (Q Kᵀ) / √d_head + bias,   bias = (1 − mask) · finfo(dtype).min
    context = Drop(softmax(scores)) V

``attention_mask`` is [B, T] with 1 = a real token, 0 = padding. As in HF BERT
the mask becomes an additive bias over the key axis: 0 for kept keys and the
most negative finite float (``finfo(dtype).min``) for padded ones, so padded
keys get exactly zero probability in float32 (e^(min − max) underflows to 0),
and a fully padded row stays finite (uniform weights, no NaN). Query rows at
padded positions are computed but do not influence unpadded rows.

Module names match HF so its weights load by name: ``self.query``, ``self.key``,
``self.value`` (SelfAttention) and ``output.dense``, ``output.LayerNorm``.
"""
import math

import numpy as np

from .. import functional as F
from ..tensor import Tensor, make_node
from .layers import Dropout, Linear, SublayerOutput
from .module import Module


def attention_bias(attention_mask, dtype=np.float32, like: Tensor = None) -> Tensor:
    """Additive bias (B, 1, 1, T) from a [B, T] keep-mask: 0 where 1, finfo(dtype).min where 0."""
    mask = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
    xp = like.xp if like is not None else np
    mask = xp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T] (1 = keep, 0 = pad), got shape {mask.shape}")
    bias = (1 - mask.astype(dtype)) * np.finfo(dtype).min  # (B, T)
    return Tensor(bias[:, None, None, :])  # (B, 1, 1, T)


def scaled_masked_softmax(scores: Tensor, scale: float, bias: Tensor = None) -> Tensor:
    """softmax(scores · scale + bias) over the last axis, as one node (fused, stable).

    Only the probabilities p are kept for the backward:
    d scores = scale · p ⊙ (g − Σ_j g_j p_j). ``bias`` is a constant (no gradient).
    """
    xp = scores.xp
    z = scores.data * scores.dtype.type(scale)  # (B, H, T, T)
    if bias is not None:
        z += bias.data if isinstance(bias, Tensor) else bias
    z -= z.max(axis=-1, keepdims=True)
    xp.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    out = make_node(z, (scores,), "masked_softmax")
    if out.requires_grad:
        def backward_fn(g):
            grad = g - (g * z).sum(axis=-1, keepdims=True)
            grad *= z
            grad *= scale
            scores.accumulate_grad(grad)
        out.backward_fn = backward_fn
    return out


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor = None,
                                 dropout_p: float = 0.0, training: bool = False, generator=None) -> Tensor:
    """softmax(q kᵀ/√d + bias) v on (B, H, T, d) heads; ``bias`` broadcasts to (B, H, T, T)."""
    scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
    probs = scaled_masked_softmax(scores, 1.0 / math.sqrt(q.shape[-1]), bias)  # (B, H, T, T); bias (B, 1, 1, T)
    probs = F.dropout(probs, dropout_p, training, generator)
    return probs @ v  # (B, H, T, d)


class SelfAttention(Module):
    """Q, K, V projections and attention over heads (HF's BertSelfAttention): (B, T, D) → (B, T, D)
    context, before the output projection. ``dropout`` applies to the attention probabilities."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, generator=None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.query = Linear(hidden_size, hidden_size, generator=generator)
        self.key = Linear(hidden_size, hidden_size, generator=generator)
        self.value = Linear(hidden_size, hidden_size, generator=generator)
        self.dropout = Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        # (B, T, D) -> (B, H, T, d): one reshape (a view) and one permute (a view)
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: Tensor, attention_mask=None, bias: Tensor = None) -> Tensor:
        # x: (B, T, D); attention_mask: (B, T) 1 = keep, 0 = pad; or a precomputed bias (B, 1, 1, T)
        b, t, d = x.shape
        if bias is None and attention_mask is not None:
            bias = attention_bias(attention_mask, x.dtype, like=x)
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # (B, H, T, d)
        context = scaled_dot_product_attention(q, k, v, bias, self.dropout.p, self.training,
                                               self.dropout.generator)  # (B, H, T, d)
        return context.permute(0, 2, 1, 3).reshape(b, t, d)  # (B, T, D)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class MultiHeadSelfAttention(Module):
    """A full attention sub-layer (HF's BertAttention): ``self`` (SelfAttention) then ``output``
    (dense → dropout → + x → LayerNorm).

    Post-LN (BERT, default): LN(x + Drop(dense(Attn(x)))).
    Pre-LN (``norm_first``): x + Drop(dense(Attn(LN(x)))).
    ``residual=False``: just Drop(dense(Attn(x))) (``output.LayerNorm`` is then unused).
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.0,
                 hidden_dropout: float = 0.0, eps: float = 1e-12, norm_first: bool = False,
                 residual: bool = True, generator=None):
        super().__init__()
        self.norm_first, self.residual = norm_first, residual
        self.self = SelfAttention(hidden_size, num_heads, attention_dropout, generator=generator)
        self.output = SublayerOutput(hidden_size, hidden_size, hidden_dropout, eps, norm_first, generator)

    def forward(self, x: Tensor, attention_mask=None, bias: Tensor = None) -> Tensor:
        # x: (B, T, D), attention_mask: (B, T) -> (B, T, D)
        inner = self.output.LayerNorm(x) if self.norm_first and self.residual else x
        context = self.self(inner, attention_mask, bias)  # (B, T, D)
        return self.output(context, x if self.residual else None)  # (B, T, D)
