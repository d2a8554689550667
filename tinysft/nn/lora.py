"""LoRA: low-rank adapters on frozen Linear layers, with Hugging Face PEFT's names and init.

A LoRA layer keeps the pretrained W (out, in) frozen and learns a rank-r update:

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,    A (r, in),  B (out, r),  s = α/r  (rsLoRA: α/√r)

A starts Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in) (PyTorch's Linear
init, which PEFT uses for A); B starts at zero, so the tuned model starts
exactly equal to the base. Only A and B train. ``merge()`` folds the update into
the weight, W ← W + s·BA, so inference costs nothing extra; ``unmerge()`` takes
it out again.

Gradients (g = ∂L/∂y, rows of x and g flattened to N; u = drop(x) Aᵀ, shape (N, r)):

    dB = s · gᵀ u          (out, r)
    dA = s · Bᵀ gᵀ drop(x)  (r, in)

The whole layer is one node, ``lora_linear``, for memory: composed of F.linear, F.dropout and
an addition, the graph held the base output, the branch output and their sum (three (N, out)
arrays), the float dropout mask and drop(x) (two (N, in)) until the backward; one node holds its
output, the keep mask as booleans (one byte per input entry) and u (N, r), besides x, which the
base needs anyway, and recomputes drop(x) in the backward. The values and gradients are the
composition's, bit for bit. Each adapter draws its own dropout mask, as PEFT's do. W gets no
gradient while frozen. Parameter names follow PEFT with the adapter name left out, as PEFT saves
them: ``…q_proj.weight`` (the base, unchanged), ``…q_proj.lora_A.weight``,
``…q_proj.lora_B.weight``.

>>> summary = apply_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
>>> print(summary)                    # trainable params: … || all params: … || trainable%: …
>>> merge_and_unload(model)           # plain Linear layers holding W + s·BA, for export
"""
import math
import re
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..tensor import ShapeError, Tensor, lift, make_node
from .layers import Dropout, Linear
from .module import Module

# every projection of a Llama decoder layer (Hugging Face names); embeddings and the head are left out
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r with rank-stabilised LoRA (the update's scale then does not shrink as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check_hyperparameters(r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise ValueError(f"LoRA: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not math.isfinite(alpha):
        raise ValueError(f"LoRA: alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA: dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(Module):
    """A Linear layer plus a trainable low-rank update (see the module docstring for the math).

    ``base``'s weight and bias Parameters are shared, not copied, and frozen; the
    base Linear itself is kept for ``merge_and_unload``.
    """

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 generator=None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a Linear layer, got {type(base).__name__}")
        _check_hyperparameters(r, alpha, dropout)
        object.__setattr__(self, "base_layer", base)  # not registered: its Parameters are ours below
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = int(r), float(alpha), bool(rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.rslora)
        self.merged = False
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        dtype = base.weight.dtype
        self.lora_dropout = Dropout(dropout, generator=generator)
        self.lora_A = Linear(self.in_features, self.r, bias=False, generator=generator, dtype=dtype)  # U(±1/√in)
        self.lora_B = Linear(self.r, self.out_features, bias=False, dtype=dtype)
        self.lora_B.weight.data[...] = 0
        if base.weight.device != "cpu":
            self.lora_A.to(base.weight.device)
            self.lora_B.to(base.weight.device)
        self.train(base.training)  # a model in eval mode keeps its adapters' dropout off

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in) -> (..., out)
        if self.merged:
            return F.linear(x, self.weight, self.bias)  # W already holds s·BA
        drop = self.lora_dropout
        keep = None
        if drop.training and drop.p > 0:  # F.dropout's draws (so a seed gives its masks), kept as booleans
            keep = F.dropout_keep(x.shape, drop.p, x.dtype, x.device, drop.generator)  # (..., in)
        return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           keep, F.dropout_scale(drop.p))

    def delta_weight(self):
        """s·BA (out, in), computed in float64 so that merge and unmerge each round only once."""
        a = self.lora_A.weight.data.astype(np.float64)  # (r, in)
        b = self.lora_B.weight.data.astype(np.float64)  # (out, r)
        return self.scaling * (b @ a)

    def merge(self):
        """W ← W + s·BA (in place; the forward then skips the adapter, so A and B get no gradient
        until ``unmerge``). A no-op when merged.

        W and W + s·BA are rounded once each to the weight's dtype, so ``unmerge``
        restores W within one rounding of the merged value: elementwise
        |W_restored − W| ≤ ε·max(|W|, |W + s·BA|) with ε = 2⁻²³ in float32 (2⁻⁵² in float64).
        """
        if not self.merged:
            w = self.weight
            w.data[...] = (w.data.astype(np.float64) + self.delta_weight()).astype(w.dtype)
            self.merged = True
        return self

    def unmerge(self):
        """W ← W − s·BA, undoing ``merge`` (within the round-off stated there). A no-op when not merged."""
        if self.merged:
            w = self.weight
            w.data[...] = (w.data.astype(np.float64) - self.delta_weight()).astype(w.dtype)
            self.merged = False
        return self

    def extra_repr(self):
        kind = ", rslora" if self.rslora else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}{kind}, merged={self.merged}")


def lora_linear(x: Tensor, weight: Tensor, bias, a: Tensor, b: Tensor, scaling: float, keep=None,
                keep_scale: float = 1.0) -> Tensor:
    """y = x Wᵀ + bias + s · ((x ⊙ m) Aᵀ) Bᵀ as one node: x (..., in), W (out, in), bias (out,) or
    None, A (r, in), B (out, r) → (..., out). ``keep``: a boolean mask of x's shape (None: keep
    all), m = keep · ``keep_scale`` (inverted dropout: 1/(1 − p) where kept, 0 where dropped).

    With rows flattened to N, d = x ⊙ m (N, in), u = s · d Aᵀ (N, r), g the upstream (N, out):
      forward:   y = x Wᵀ + bias + u Bᵀ
      backward:  dB = gᵀ u;   v = s · g B  (N, r);   dA = vᵀ d;   dx = g W + (v A) ⊙ m;
                 dW = gᵀ x,  dbias = Σ_rows g  (only when W, bias train)
    Saved: x (the base needs it anyway), the mask and u; d is recomputed in the backward.
    """
    weight, a, b = lift(weight, x), lift(a, x), lift(b, x)
    out_features, in_features = weight.shape
    if x.ndim == 0 or x.shape[-1] != in_features or a.shape[1:] != (in_features,) or \
            b.shape != (out_features, a.shape[0]):
        raise ShapeError(f"lora_linear: input {x.shape}, W {weight.shape}, A {a.shape}, B {b.shape} do not fit "
                         "(need x (..., in), W (out, in), A (r, in), B (out, r))")
    if keep is not None and tuple(keep.shape) != x.shape:
        raise ShapeError(f"lora_linear: keep mask of shape {tuple(keep.shape)} for an input of shape {x.shape}")
    xp = x.xp
    flat = x.data.reshape(-1, in_features)  # (N, in)
    mask = None if keep is None else xp.asarray(keep, dtype=bool).reshape(-1, in_features)  # (N, in)

    def dropped(array):  # array ⊙ m, a fresh array (array itself when nothing is dropped)
        if mask is None:
            return array
        out = array * mask
        out *= keep_scale
        return out

    u = dropped(flat) @ a.data.T  # (N, r)
    u *= scaling
    value = flat @ weight.data.T  # (N, out)
    if bias is not None:
        bias = lift(bias, x)
        value += bias.data
    value += u @ b.data.T  # (N, out)
    params = (x, weight, a, b) if bias is None else (x, weight, a, b, bias)
    out = make_node(value.reshape(*x.shape[:-1], out_features), params, "lora_linear")
    if out.requires_grad:
        def backward_fn(grad):
            g = grad.reshape(-1, out_features)  # (N, out)
            v = g @ b.data  # (N, r)
            v *= scaling
            if b.requires_grad:
                b.accumulate_grad(g.T @ u, owned=True)  # (out, r)
            if a.requires_grad:
                a.accumulate_grad(v.T @ dropped(flat), owned=True)  # (r, in)
            if x.requires_grad:
                dx = g @ weight.data  # (N, in)
                dx += dropped(v @ a.data)
                x.accumulate_grad(dx.reshape(x.shape), owned=True)
            if weight.requires_grad:
                weight.accumulate_grad(g.T @ flat, owned=True)
            if bias is not None and bias.requires_grad:
                bias.accumulate_grad(g.sum(axis=0), owned=True)
        out.backward_fn = backward_fn
    return out


@dataclass(frozen=True)
class LoRASummary:
    """What ``apply_lora`` did: the wrapped module names and the parameter counts after it."""
    targets: tuple
    trainable: int
    total: int

    def __str__(self):
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (f"LoRA on {len(self.targets)} modules — trainable params: {self.trainable:,} || "
                f"all params: {self.total:,} || trainable%: {share:.4f}")


def _name_matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regular expression the whole dotted name must match; a list of
    names matches a module whose name is one of them or ends in "." + one of them."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _tied_owners(model: Module) -> dict:
    """id(Parameter or Module) → every dotted name that holds it, for objects held in more than one place."""
    holders = {}
    for owner_name, owner in model.named_modules():
        prefix = owner_name + "." if owner_name else ""
        for name, value in [*owner._parameters.items(), *owner._modules.items()]:
            if value is not None:
                holders.setdefault(id(value), []).append(prefix + name)
    return {key: names for key, names in holders.items() if len(names) > 1}


def find_targets(model: Module, target_modules) -> list:
    """``[(dotted name, Linear)]`` of the modules ``target_modules`` selects (PEFT's matching rules).

    Raises a ValueError when nothing matches (listing some Linear names), when a
    target already carries an adapter or shares its weight with another module
    (tied embeddings: merging there would change both); a TypeError when a
    target is not a Linear.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"LoRA: target_modules must be module names or one regular expression, "
                             f"got {target_modules!r}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"LoRA: target_modules {target_modules!r} is not a valid regular expression "
                             f"({error})") from None
    matched = [(name, m) for name, m in model.named_modules() if name and _name_matches(name, target_modules)]
    if not matched:
        linears = [name for name, m in model.named_modules() if isinstance(m, Linear)]
        sample = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "") if linears else "none"
        raise ValueError(f"LoRA: no module matches target_modules {target_modules!r} (a list matches the last "
                         f"part(s) of a module's dotted name, a string the whole name as a regular expression); "
                         f"Linear modules here: {sample}")
    tied = _tied_owners(model)
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"LoRA: {name} already has an adapter (call apply_lora once per model)")
        if not isinstance(module, Linear):
            raise TypeError(f"LoRA: target {name} ({type(module).__name__}) is not a Linear "
                            f"(LoRA here adapts Linear layers only; embeddings are never targeted)")
        shared = tied.get(id(module)) or tied.get(id(module.weight))
        if shared:
            raise ValueError(f"LoRA: {name} shares its weight with {', '.join(n for n in shared if n != name)} "
                             f"(tied weights): an adapter there would change both on merge; leave it out of "
                             f"target_modules")
    return matched


def apply_lora(model: Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               target_modules=LLAMA_TARGETS, rslora: bool = False, generator=None) -> LoRASummary:
    """Replace every Linear that ``target_modules`` selects by a LoRALinear around it, in place,
    and freeze every other parameter: afterwards only the adapters' A and B train.

    ``target_modules``: a list of names, each matching a module whose dotted name
    ends with it (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``), or a
    string, a regular expression the whole dotted name must match (PEFT's rules).
    Returns a LoRASummary (wrapped names, trainable and total parameter counts).
    """
    _check_hyperparameters(r, alpha, dropout)
    targets = find_targets(model, target_modules)
    model.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf,
                LoRALinear(linear, r, alpha, dropout, rslora=rslora, generator=generator))
    return LoRASummary(tuple(name for name, _ in targets), model.num_parameters(trainable_only=True),
                       model.num_parameters())


def lora_layers(model: Module) -> list:
    """``[(dotted name, LoRALinear)]`` in the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: Module) -> Module:
    """``merge()`` every adapter in the model (W ← W + s·BA); returns the model."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: Module) -> Module:
    """``unmerge()`` every adapter in the model; returns the model."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: Module) -> Module:
    """Merge every adapter and put the plain base Linear back in its place: the model is then
    an ordinary one holding W + s·BA under the base's names (to save or export), with the
    adapters gone. In place; the weights stay frozen (``model.unfreeze()`` to train them)."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.base_layer)
    return model
