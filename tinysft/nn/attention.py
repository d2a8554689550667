"""Attention modules with a padding mask, laid out as Hugging Face's BERT.

The ops (the bias, the fused scaled masked softmax, scaled dot-product attention)
are in ``tinysft.functional``; these modules hold the projections and call them.

    scores = (Q Kᵀ) / √d_head + bias,   bias = (1 − mask) · finfo(dtype).min
    context = Drop(softmax(scores)) V

``attention_mask`` is [B, T] with 1 = a real token, 0 = padding. As in HF BERT
the mask becomes an additive bias over the key axis: 0 for kept keys and the
most negative finite float (``finfo(dtype).min``) for padded ones, so padded
keys get exactly zero probability in float32 (e^(min − max) underflows to 0),
and a fully padded row stays finite (uniform weights, no NaN). Query rows at
padded positions are computed but do not influence unpadded rows.

Module names match HF so its weights load by name: ``self.query``, ``self.key``,
``self.value`` (MultiHeadAttention) and ``output.dense``, ``output.LayerNorm``.
"""
from .. import functional as F
from ..tensor import Tensor
from .layers import Dropout, Linear, SublayerOutput
from .module import Module


class MultiHeadAttention(Module):
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
            bias = F.attention_bias(attention_mask, x.dtype, like=x)
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # (B, H, T, d)
        context = F.scaled_dot_product_attention(q, k, v, bias, self.dropout.p, self.training,
                                                 self.dropout.generator)  # (B, H, T, d)
        return context.permute(0, 2, 1, 3).reshape(b, t, d)  # (B, T, D)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class AttentionSublayer(Module):
    """The attention sub-layer of an encoder layer (HF's BertAttention): ``self``
    (MultiHeadAttention) then ``output`` (dense → dropout → + x → LayerNorm).

    Post-LN (BERT, default): LN(x + Drop(dense(Attn(x)))).
    Pre-LN (``norm_first``): x + Drop(dense(Attn(LN(x)))).
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.0,
                 hidden_dropout: float = 0.0, eps: float = 1e-12, norm_first: bool = False, generator=None):
        super().__init__()
        self.norm_first = norm_first
        self.self = MultiHeadAttention(hidden_size, num_heads, attention_dropout, generator=generator)
        self.output = SublayerOutput(hidden_size, hidden_size, hidden_dropout, eps, norm_first, generator)

    def forward(self, x: Tensor, attention_mask=None, bias: Tensor = None) -> Tensor:
        # x: (B, T, D), attention_mask: (B, T) -> (B, T, D)
        inner = self.output.LayerNorm(x) if self.norm_first else x
        context = self.self(inner, attention_mask, bias)  # (B, T, D)
        return self.output(context, x)  # (B, T, D)
