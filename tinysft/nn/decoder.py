"""Blocks of a Llama-family causal decoder: RMSNorm, grouped-query attention, SwiGLU MLP, the layer.

One pre-norm decoder layer, with Hugging Face's (Llama, Mistral, Qwen) names:
    h = x + o_proj(Attn(RoPE(q_proj n), RoPE(k_proj n), v_proj n)),   n = input_layernorm(x)
    y = h + down_proj(silu(gate_proj m) · up_proj m),                  m = post_attention_layernorm(h)
Attention is causal (and padding- or segment-masked) through a boolean mask from
``F.causal_mask``; the rotary tables (cos, sin) come from ``F.rope_cache``, computed once per
forward by the model and shared by every layer. Projections have no bias.

With a KV cache (inference only), each attention layer appends its new keys and values to its
slot of the cache and attends over everything cached so far; see ``tinysft.models.generation``.
"""
import numpy as np

from .. import functional as F
from ..tensor import Tensor
from .layers import Linear
from .module import Module, Parameter


class RMSNorm(Module):
    """x / √(mean(x²) + eps) · weight over the last axis (weight = 1 at init); no centring, no bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(hidden_size, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., D) -> (..., D)
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GroupedQueryAttention(Module):
    """Causal self-attention with rotary positions and ``num_kv_heads`` ≤ ``num_heads`` key/value
    heads (query head h reads kv head h // (num_heads / num_kv_heads)). HF's LlamaAttention."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int = None,
                 generator=None):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.q_proj = Linear(hidden_size, num_heads * self.head_dim, bias=False, generator=generator)
        self.k_proj = Linear(hidden_size, num_kv_heads * self.head_dim, bias=False, generator=generator)
        self.v_proj = Linear(hidden_size, num_kv_heads * self.head_dim, bias=False, generator=generator)
        self.o_proj = Linear(num_heads * self.head_dim, hidden_size, bias=False, generator=generator)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        # (B, T, heads·Dh) -> (B, heads, T, Dh)
        b, t, _ = x.shape
        return x.reshape(b, t, heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: Tensor, rope, mask=None, cache=None) -> Tensor:
        # x: (B, T, D); rope: (cos, sin) each (B or 1, 1, T, Dh/2); mask: bool (B or 1, 1, T, S);
        # cache: a layer's slot of a KV cache (append(k, v) -> every cached k, v) or None -> (B, T, D)
        b, t, _ = x.shape
        q = F.rope(self._heads(self.q_proj(x), self.num_heads), *rope)  # (B, Hq, T, Dh)
        k = F.rope(self._heads(self.k_proj(x), self.num_kv_heads), *rope)  # (B, Hkv, T, Dh)
        v = self._heads(self.v_proj(x), self.num_kv_heads)  # (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, S, Dh): the past and these T positions
        y = F.attention(q, k, v, mask)  # (B, Hq, T, Dh)
        return self.o_proj(y.permute(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim))  # (B, T, D)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"


class SwiGLUMLP(Module):
    """down_proj(silu(gate_proj x) · up_proj x), no biases (HF's LlamaMLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int, generator=None):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False, generator=generator)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False, generator=generator)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., D) -> (..., F) -> (..., D)
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(Module):
    """Pre-norm attention then a pre-norm SwiGLU MLP, each with a residual (HF's LlamaDecoderLayer)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 eps: float = 1e-5, head_dim: int = None, generator=None):
        super().__init__()
        self.self_attn = GroupedQueryAttention(hidden_size, num_heads, num_kv_heads, head_dim, generator)
        self.mlp = SwiGLUMLP(hidden_size, intermediate_size, generator)
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: Tensor, rope, mask=None, cache=None) -> Tensor:
        # x: (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


__all__ = ["DecoderLayer", "GroupedQueryAttention", "RMSNorm", "SwiGLUMLP"]
