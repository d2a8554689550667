"""Transformer encoder layers (post-LN as BERT, or pre-LN), pooling and a classification head.

One layer, with names as HF's BertLayer:
    post-LN:  h = LN₁(x + Drop(Attn(x)));   y = LN₂(h + Drop(W₂ act(W₁ h)))
    pre-LN:   h = x + Drop(Attn(LN₁(x)));   y = h + Drop(W₂ act(W₁ LN₂(h)))
LN₁ is ``attention.output.LayerNorm``, W₁ ``intermediate.dense``, W₂ ``output.dense``,
LN₂ ``output.LayerNorm``.

Per-layer dropout. Each layer has three dropouts: the attention probabilities'
(``attention.self.dropout``) and the two sub-layer outputs' (``attention.output.dropout``,
``output.dropout``). ``TransformerEncoder.set_dropout(rates)`` gives layer i the rate
``rates[i]`` for all three, bottom layer first; ``dropout_schedule`` turns a spec into rates:

    "linear:LOW:HIGH"   p_i = LOW + (HIGH − LOW)·i/(L − 1), i = 0 (bottom) … L − 1 (top); LOW if L = 1
    "p_0,p_1,...,p_L−1" one rate per layer
    "none"              None: every layer keeps the rates it was built with

so that, as is often advised for fine-tuning, layers near the output can drop more than
those near the input.

    >>> dropout_schedule("linear:0.05:0.2", 4)
    [0.05, 0.1, 0.15, 0.2]
"""
from .. import functional as F
from ..tensor import Tensor
from .attention import AttentionSublayer
from .layers import Dropout, LayerNorm, Linear, SublayerOutput, Tanh, activation
from .module import Module, ModuleList


def parse_dropout_schedule(spec: str):
    """``spec`` read without a layer count: None ("none"), ("linear", LOW, HIGH) or ("list", [p, ...]);
    ValueError saying what is allowed. Every rate is in [0, 1)."""
    if spec == "none":
        return None
    try:
        if spec.startswith("linear:"):
            parts = spec.split(":")[1:]
            if len(parts) != 2:
                raise ValueError
            parsed = ("linear", float(parts[0]), float(parts[1]))
            rates = parsed[1:]
        else:
            rates = [float(part) for part in spec.split(",")]
            parsed = ("list", rates)
    except ValueError:
        raise ValueError(f"dropout schedule {spec!r}: expected 'linear:LOW:HIGH', a list 'p0,p1,...' "
                         "(one rate per layer, bottom first) or 'none'") from None
    if not all(0.0 <= p < 1.0 for p in rates):  # False for nan
        raise ValueError(f"dropout schedule {spec!r}: every rate must be in [0, 1)")
    return parsed


def dropout_schedule(spec: str, num_layers: int):
    """The rates of layers 0 (bottom) … num_layers − 1 that ``spec`` gives (see the module docstring),
    or None for "none"; ValueError for a malformed spec or a list of another length."""
    parsed = parse_dropout_schedule(spec)
    if parsed is None:
        return None
    if parsed[0] == "list":
        if len(parsed[1]) != num_layers:
            raise ValueError(f"dropout schedule {spec!r}: {len(parsed[1])} rates for {num_layers} layers")
        return parsed[1]
    _, low, high = parsed
    return [low if num_layers == 1 else round(low + (high - low) * i / (num_layers - 1), 12)
            for i in range(num_layers)]


class Intermediate(Module):
    """The FFN's expansion: ``dense`` then the activation (HF's BertIntermediate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation_fn="gelu", generator=None):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size, generator=generator)
        self.intermediate_act_fn = activation(activation_fn)

    def forward(self, h: Tensor) -> Tensor:
        # h: (B, T, D) -> (B, T, I)
        return self.intermediate_act_fn(self.dense(h))


class TransformerEncoderLayer(Module):
    """Self-attention then a feed-forward block, each with dropout, a residual and LayerNorm."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, activation_fn="gelu",
                 dropout: float = 0.1, attention_dropout: float = 0.1, eps: float = 1e-12,
                 norm_first: bool = False, generator=None):
        super().__init__()
        self.norm_first = norm_first
        self.attention = AttentionSublayer(hidden_size, num_heads, attention_dropout, dropout, eps,
                                           norm_first, generator=generator)
        self.intermediate = Intermediate(hidden_size, intermediate_size, activation_fn, generator)
        self.output = SublayerOutput(intermediate_size, hidden_size, dropout, eps, norm_first, generator)

    def dropouts(self) -> dict:
        """The layer's Dropout modules by name: attention probabilities, attention output, FFN output."""
        return {"attention": self.attention.self.dropout, "attention_output": self.attention.output.dropout,
                "output": self.output.dropout}

    def set_dropout(self, p: float) -> None:
        for module in self.dropouts().values():
            module.p = p

    def forward(self, x: Tensor, attention_mask=None, bias: Tensor = None) -> Tensor:
        # x: (B, T, D), attention_mask: (B, T) 1 = keep, 0 = pad -> (B, T, D)
        h = self.attention(x, attention_mask, bias)  # (B, T, D)
        inner = self.output.LayerNorm(h) if self.norm_first else h
        return self.output(self.intermediate(inner), h)  # (B, T, I) -> (B, T, D)


class TransformerEncoder(Module):
    """``num_layers`` TransformerEncoderLayers in ``layer`` (a ModuleList, so names read
    ``layer.3.attention.self.query.weight``). Pre-LN stacks end with ``final_norm``."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
                 activation_fn="gelu", dropout: float = 0.1, attention_dropout: float = 0.1,
                 eps: float = 1e-12, norm_first: bool = False, generator=None):
        super().__init__()
        self.layer = ModuleList(
            TransformerEncoderLayer(hidden_size, num_heads, intermediate_size, activation_fn, dropout,
                                    attention_dropout, eps, norm_first, generator)
            for _ in range(num_layers))
        self.final_norm = LayerNorm(hidden_size, eps=eps) if norm_first else None

    def set_dropout(self, rates) -> None:
        """Layer i drops with ``rates[i]`` (bottom first) in its attention probabilities and both outputs."""
        rates = [float(p) for p in rates]
        if len(rates) != len(self.layer) or not all(0.0 <= p <= 1.0 for p in rates):
            raise ValueError(f"set_dropout needs {len(self.layer)} rates in [0, 1], one per layer, got {rates}")
        for layer, p in zip(self.layer, rates):
            layer.set_dropout(p)

    def dropout_rates(self) -> list:
        """Per layer, bottom first: ``{"attention": p, "attention_output": p, "output": p}``."""
        return [{name: module.p for name, module in layer.dropouts().items()} for layer in self.layer]

    def forward(self, x: Tensor, attention_mask=None, output_hidden_states: bool = False):
        # x: (B, T, D), attention_mask: (B, T) -> (B, T, D); with output_hidden_states also the
        # list [input, after layer 0, ..., after the last layer] of (B, T, D)
        bias = F.attention_bias(attention_mask, x.dtype, like=x) if attention_mask is not None else None
        states = [x]
        for layer in self.layer:
            x = layer(x, bias=bias)
            states.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            states[-1] = x
        return (x, states) if output_hidden_states else x


POOLINGS = {"cls": F.cls_pool, "mean": F.mean_pool}


class Pooler(Module):
    """BERT's pooler: tanh(dense(h[:, 0])) (B, T, D) -> (B, D)."""

    def __init__(self, hidden_size: int, generator=None):
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size, generator=generator)
        self.activation = Tanh()

    def forward(self, hidden: Tensor) -> Tensor:
        # hidden: (B, T, D) -> (B, D)
        return self.activation(self.dense(hidden[:, 0]))


class ClassificationHead(Module):
    """Pooled features → [dense → tanh] → dropout → ``classifier`` Linear → logits.

    ``pooler=True`` adds BERT's dense+tanh before the dropout; ``dense`` then exists.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooler: bool = False,
                 generator=None):
        super().__init__()
        self.num_labels = num_labels
        if pooler:
            self.dense = Linear(hidden_size, hidden_size, generator=generator)
            self.activation = Tanh()
        else:
            self.dense = None
        self.dropout = Dropout(dropout)
        self.classifier = Linear(hidden_size, num_labels, generator=generator)

    def forward(self, pooled: Tensor) -> Tensor:
        # pooled: (B, D) -> logits (B, num_labels)
        if self.dense is not None:
            pooled = self.activation(self.dense(pooled))
        return self.classifier(self.dropout(pooled))

    def extra_repr(self):
        return f"num_labels={self.num_labels}"


__all__ = [
    "POOLINGS",
    "ClassificationHead",
    "Intermediate",
    "Pooler",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
