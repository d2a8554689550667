"""Deliberately wrong implementations, one or more per check: each must make its check fail.

Each mutant is a classic mistake (Adam without bias correction, dropout without
rescaling, ...). Where the real implementation's *value* is right but its
*gradient* is wrong, the mutant is built with the straight-through trick
``value.detach() + (wrong − wrong.detach())``: the value of ``value``, the
gradient of ``wrong``.
"""
import math
from types import SimpleNamespace

import numpy as np

from tinysft import functional as F
from tinysft.finetune import causal_lm
from tinysft.finetune.distill import kd_loss
from tinysft.finetune.strategies import fisher_diagonal, prepare
from tinysft.nn.lora import LoRALinear
from tinysft.optim import SGD, Adam, clip_grad_norm_, penalty_loss
from tinysft.optim.optimizer import Optimizer
from tinysft.tensor import Tensor


def value_of(right, grad_of):
    """A Tensor with the value of ``right`` and the gradient of ``grad_of``."""
    return right.detach() + (grad_of - grad_of.detach())


# ----- losses
def ce_grad_missing_mean(logits, target, ignore_index=-100, label_smoothing=0.0):
    """Right loss, but the gradient of the *sum*: (p − y) instead of (p − y)/N."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            reduction="sum")
    return value_of(F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing),
                    total)


def ce_mean_over_all_rows(logits, target, ignore_index=-100, label_smoothing=0.0):
    """Divides by N instead of the number of non-ignored rows."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            reduction="sum")
    return total * (1.0 / logits.shape[0])


def ce_smoothing_ignored(logits, target, ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def mse_grad_missing_2(x, y):
    """Right value, gradient (x − y)/n."""
    loss = F.mse_loss(x, y)
    return value_of(loss, loss * 0.5)


# ----- optimizers
class SGDNoMomentum(SGD):
    def __init__(self, params, **kw):
        kw.pop("momentum", None)
        kw.pop("nesterov", None)
        super().__init__(params, **kw)


class SGDNesterovIgnored(SGD):
    def __init__(self, params, **kw):
        kw.pop("nesterov", None)
        super().__init__(params, **kw)


class SGDAscent(SGD):
    """θ ← θ + η∇L."""

    def _update(self, p, grad, state, group):
        super()._update(p, -grad, state, group)


class AdamNoBiasCorrection(Optimizer):
    """m/(√v + ε) with the raw moments: the first steps are ~3× too long."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled))

    def _update(self, p, grad, state, group):
        b1, b2 = group["betas"]
        if not state:
            state["m"], state["v"] = np.zeros_like(p.data), np.zeros_like(p.data)
        if group["decoupled"]:
            p.data -= group["lr"] * group["weight_decay"] * p.data
        else:
            grad = grad + group["weight_decay"] * p.data
        state["m"] = b1 * state["m"] + (1 - b1) * grad
        state["v"] = b2 * state["v"] + (1 - b2) * grad * grad
        p.data -= group["lr"] * state["m"] / (np.sqrt(state["v"]) + group["eps"])


def adamw_coupled(params, weight_decay=1e-2, **kw):
    """An "AdamW" that adds λθ to the gradient: plain Adam with L2."""
    return Adam(params, weight_decay=weight_decay, **kw)


class SGDDecayTwice(SGD):
    """Weight decay applied as 2λθ."""

    def __init__(self, params, weight_decay=0.0, **kw):
        super().__init__(params, weight_decay=2 * weight_decay, **kw)


# ----- penalties
def _penalty_variant(transform):
    def broken(groups):
        patched = []
        for g in groups:
            g = dict(g)
            g.update(transform(g))
            patched.append(g)
        return penalty_loss(patched)
    return broken


def l1_smoothed(groups):
    """λΣ√(θ² + 0.01): a smooth stand-in for |θ| — wrong value and wrong (sub)gradient."""
    total = None
    for g in groups:
        for p in g["params"]:
            term = ((p * p + 0.01) ** 0.5).sum() * g["penalty_lambda"]
            total = term if total is None else total + term
    return total


l2_half = _penalty_variant(lambda g: {"penalty_lambda": g["penalty_lambda"] / 2})  # gradient λθ, not 2λθ
l2sp_towards_zero = _penalty_variant(lambda g: {"penalty": "l2"})  # forgets θ₀


def l2_gradient_lambda(groups):
    """Right value λΣθ², gradient λθ (the (λ/2)Σθ² convention's)."""
    return value_of(penalty_loss(groups), l2_half(groups))


# ----- dropout
def dropout_no_rescale(x, p=0.5, training=True, generator=None):
    """Zeroes with probability p but does not divide by 1 − p: E[y] = (1 − p)x."""
    if not training:
        return x
    keep = generator.random(x.shape) >= p
    return x * Tensor(keep.astype(x.dtype))


def dropout_half_rate(x, p=0.5, training=True, generator=None):
    """Drops with probability p/2 (rescaled for p/2): the mean is right, the variance is not."""
    return F.dropout(x, p / 2, training, generator)


def dropout_rescale_in_eval(x, p=0.5, training=True, generator=None):
    """Divides by 1 − p in evaluation too."""
    if not training:
        return x * (1.0 / (1.0 - p))
    return F.dropout(x, p, training, generator)


def schedule_top_down(encoder, rates):
    """Applies the per-layer rates from the top layer down."""
    encoder.set_dropout(rates[::-1])


def schedule_hidden_only(encoder, rates):
    """Sets the sub-layer output dropouts but leaves the attention probabilities at the built rate."""
    for layer, p in zip(encoder.layer, rates):
        layer.attention.output.dropout.p = layer.output.dropout.p = p


# ----- clipping
def clip_always_scale(parameters, max_norm):
    """g ← g·c/‖g‖ even when ‖g‖ < c."""
    grads = [p.grad for p in parameters]
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    for g in grads:
        g *= max_norm / norm
    return norm


def clip_per_tensor(parameters, max_norm):
    """Clips each tensor to norm c/2 separately: the direction changes."""
    parameters = list(parameters)
    norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in parameters))
    for p in parameters:
        clip_grad_norm_([p], max_norm / 2)
    return norm


def clip_value_upper_only(parameters, clip_value):
    for p in parameters:
        np.minimum(p.grad, clip_value, out=p.grad)


# ----- stability
def naive_log_softmax(x, axis=-1):
    return x - x.exp().sum(axis=axis, keepdims=True).log()


def unstable_functional():
    return SimpleNamespace(log_softmax=naive_log_softmax, softmax=lambda x, axis=-1: naive_log_softmax(x, axis).exp(),
                           cross_entropy=F.cross_entropy)


def layer_norm_unbiased(x, weight=None, bias=None, eps=1e-5):
    """Uses the n − 1 variance."""
    centered = x - x.mean(axis=-1, keepdims=True)
    var = (centered * centered).sum(axis=-1, keepdims=True) * (1.0 / (x.shape[-1] - 1))
    return centered / (var + eps).sqrt() * weight + bias


def layer_norm_backward_no_projection(x, weight=None, bias=None, eps=1e-5):
    """Right values; backward treats μ and σ as constants (drops the −1/D and −x̂x̂ᵀ/D terms)."""
    right = F.layer_norm(x, weight, bias, eps)
    mean = Tensor(x.data.mean(axis=-1, keepdims=True))
    rstd = Tensor(1 / np.sqrt(x.data.var(axis=-1, keepdims=True) + eps))
    return value_of(right, (x - mean) * rstd * weight + bias)


def functional_with(**overrides):
    return SimpleNamespace(**{**{k: getattr(F, k) for k in ("log_softmax", "softmax", "cross_entropy",
                                                            "layer_norm", "gelu")}, **overrides})


def gelu_tanh_for_exact(x, approximate="none"):
    return F.gelu(x, "tanh")


def gelu_grad_missing_x_phi(x, approximate="none"):
    """Right values, gradient Φ(x) only (forgets the product rule)."""
    if approximate != "none":
        return F.gelu(x, approximate)
    from tinysft.special import normal_cdf
    cdf = Tensor(normal_cdf(x.data))
    return value_of(F.gelu(x), x * cdf)


# ----- fine-tuning
def prepare_decay_off_by_one(model, strategy, lr, decay=0.9, **kw):
    """η·decay^(d+1): the head gets η·decay too."""
    plan = prepare(model, strategy, lr, decay=decay, **kw)
    for g in plan.param_groups:
        g["lr"] *= decay
    return plan


def prepare_decay_bottom_up(model, strategy, lr, decay=0.9, **kw):
    """Depth counted from the bottom: embeddings get η, the head η·decay^(L+1)."""
    plan = prepare(model, strategy, lr, decay=decay, **kw)
    lrs = [g["lr"] for g in plan.param_groups]
    for g, new in zip(plan.param_groups, reversed(lrs)):
        g["lr"] = new
    return plan


def fisher_of_summed_loss(model, loader, **kw):
    """Squared gradients of the batch *sum* instead of the mean: n² too large."""
    return {k: v * 36.0 for k, v in fisher_diagonal(model, loader, **kw).items()}


def fisher_square_of_mean(model, loader, **kw):
    """(mean_b g)² instead of mean_b g²: the gradient of the pooled loss, squared."""
    from tinysft.finetune.batch import cross_entropy_sum
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = None
    total = sum(len(batch[1]) for batch in loader)
    loss = None
    for batch in loader:
        term = cross_entropy_sum(model, batch) * (1.0 / len(batch[1]) / len(loader))
        loss = term if loss is None else loss + term
    loss.backward()
    out = {n: np.asarray(p.grad, dtype=np.float64) ** 2 for n, p in named}
    for _, p in named:
        p.grad = None
    assert total
    return out


def fisher_impls(prepare=prepare, fisher_diagonal=fisher_diagonal):
    return SimpleNamespace(prepare=prepare, fisher_diagonal=fisher_diagonal)


def prepare_fisher_mean_normalised(model, strategy, lr, **kw):
    return prepare(model, strategy, lr, normalize="mean", **kw)


def kd_without_t2(student, teacher, labels=None, temperature=2.0, alpha=0.5, **kw):
    """α·KL + (1 − α)·CE: the T² factor forgotten."""
    soft = kd_loss(student, teacher, labels, temperature=temperature, alpha=1.0) * (alpha / temperature ** 2)
    if labels is None or alpha == 1.0:
        return soft
    return soft + F.cross_entropy(student, labels) * (1 - alpha)


def kd_swapped_kl(student, teacher, labels=None, temperature=2.0, alpha=0.5, **kw):
    """KL(p_s ‖ p_t) instead of KL(p_t ‖ p_s)."""
    t = teacher.data if isinstance(teacher, Tensor) else np.asarray(teacher)
    log_pt = Tensor(t / temperature - np.logaddexp.reduce(t / temperature, axis=-1, keepdims=True))
    log_ps = F.log_softmax(student * (1.0 / temperature), axis=-1)
    rows = (log_ps.exp() * (log_ps - log_pt)).sum(axis=-1)
    valid = np.ones(rows.shape[0], bool) if labels is None else np.asarray(labels) != -100
    soft = (rows * Tensor(valid.astype(rows.dtype))).sum() * (alpha * temperature ** 2 / valid.sum())
    if labels is None or alpha == 1.0:
        return soft
    return soft + F.cross_entropy(student, labels) * (1 - alpha)


def kd_teacher_not_detached(student, teacher, labels=None, temperature=2.0, alpha=0.5, **kw):
    """Right value and student gradient, but a gradient also flows into the teacher's logits."""
    loss = kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    if isinstance(teacher, Tensor) and teacher.requires_grad:
        loss = loss + (teacher.sum() - teacher.sum().detach())
    return loss


# ----- decoder
def decoder_functional(**overrides):
    return SimpleNamespace(**{**{k: getattr(F, k) for k in ("rms_norm", "rope_cache", "rope", "swiglu",
                                                            "attention", "causal_mask")}, **overrides})


def rms_norm_eps_outside_root(x, weight, eps=1e-5):
    """x/(√mean(x²) + ε)·w."""
    return x / ((x * x).mean(axis=-1, keepdims=True).sqrt() + eps) * weight


def rms_norm_centred(x, weight, eps=1e-5):
    """LayerNorm without a bias: subtracts the mean first."""
    return F.layer_norm(x, weight, None, eps)


def rms_norm_backward_constant_scale(x, weight, eps=1e-5):
    """Right values; backward treats r = 1/√(mean(x²) + ε) as a constant (drops −x̂·mean(dx̂·x̂))."""
    rstd = Tensor(1 / np.sqrt((x.data * x.data).mean(axis=-1, keepdims=True) + eps))
    return value_of(F.rms_norm(x, weight, eps), x * rstd * weight)


def rope_interleaved(x, cos, sin):
    """Rotates the adjacent pairs (x_2i, x_2i+1) (the GPT-J layout), not (x_i, x_{i+D/2})."""
    order = np.concatenate([np.arange(0, x.shape[-1], 2), np.arange(1, x.shape[-1], 2)])
    return F.rope(x[..., order], cos, sin)[..., np.argsort(order)]


def rope_cache_half_frequencies(positions, dim, base):
    """θ_i = base^(−i/D) = (√base)^(−2i/D) instead of base^(−2i/D)."""
    return F.rope_cache(positions, dim, math.sqrt(base))


def rope_backwards_angle(x, cos, sin):
    """Rotates by −pθ: still a rotation with relative positions, the wrong one."""
    return F.rope(x, cos, -np.asarray(sin))


def rope_backward_forward_rotation(x, cos, sin):
    """Right values; the gradient is rotated forwards (Rg) instead of back (Rᵀg)."""
    return value_of(F.rope(x, cos, sin), F.rope(x, cos, -np.asarray(sin)))


def rope_absolute_sinusoid(x, cos, sin):
    """Adds sin(pθ) to x (an absolute sinusoidal embedding) instead of rotating: lengths and relative positions lost."""
    return x + Tensor(np.concatenate([sin, cos], axis=-1).astype(x.dtype))


def swiglu_sigmoid_gate(gate, up):
    """σ(a)·u (GLU) instead of a·σ(a)·u."""
    return gate.sigmoid() * up


def swiglu_grad_missing_product_rule(gate, up):
    """Right values; ∂/∂a = u·σ(a) (forgets a·σ(1 − σ))."""
    return value_of(F.swiglu(gate, up), gate * Tensor(gate.sigmoid().data) * up)


def causal_mask_sees_next(length, keys=None, key_padding=None, segment_ids=None):
    """Off by one: query i also sees key S − T + i + 1."""
    keys = length if keys is None else keys
    mask = F.causal_mask(length, keys + 1)[..., :keys]
    return mask if key_padding is None else mask & np.asarray(key_padding, bool)[:, None, None, :]


def attention_mask_ignored(q, k, v, mask=None):
    return F.attention(q, k, v)


def attention_kv_heads_tiled(q, k, v, mask=None):
    """Query head h reads kv head h mod Hkv (tiled) instead of h // G (each kv head repeated G times)."""
    tile = np.tile(np.arange(k.shape[1]), q.shape[1] // k.shape[1])
    return F.attention(q, k[:, tile], v[:, tile], mask)


def attention_softmax_denominator_constant(q, k, v, mask=None):
    """Right values; the backward treats the softmax denominator Σ_j e^(s_ij) as a constant."""
    group = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    scores = q @ k[:, group].transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    scores = F.masked_fill(scores, ~np.asarray(mask), -np.inf) if mask is not None else scores
    peak = np.maximum(scores.data.max(axis=-1, keepdims=True), np.finfo(scores.dtype).min)  # rows without keys
    weights = (scores - Tensor(peak)).exp()
    probs = weights * Tensor(1 / np.maximum(weights.data.sum(axis=-1, keepdims=True), 1))
    return value_of(F.attention(q, k, v, mask), probs @ v[:, group])


# ----- kernels (wrapping the real launchers)
def kernel_namespace(**overrides):
    from tinysft.verify.kernels import _kernels
    real = _kernels()
    return SimpleNamespace(**{**vars(real), **overrides})


def kernel_ce_smoothing_dropped():
    real = kernel_namespace()

    def broken(logits, targets, **kw):
        kw.pop("label_smoothing", None)
        return real.softmax_cross_entropy(logits, targets, **kw)
    return kernel_namespace(softmax_cross_entropy=broken)


def kernel_ce_no_row_scale():
    real = kernel_namespace()

    def broken(logits, targets, **kw):
        kw["row_scale"] = 1.0
        return real.softmax_cross_entropy(logits, targets, **kw)
    return kernel_namespace(softmax_cross_entropy=broken)


def kernel_clip_always_scale():
    real = kernel_namespace()

    def broken(grads, max_norm):
        norm = math.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in grads))
        if not math.isfinite(norm):
            return real.clip_grad_norm(grads, max_norm)
        for g in grads:
            g *= np.float32(max_norm / norm)
        return norm, False
    return kernel_namespace(clip_grad_norm=broken)


def kernel_clip_nonfinite_scaled():
    """Scales even when the norm is inf (gradients become nan)."""
    real = kernel_namespace()

    def broken(grads, max_norm):
        norm, flag = real.clip_grad_norm(grads, max_norm)
        if flag:
            for g in grads:
                g *= np.float32(0.0)
        return norm, flag
    return kernel_namespace(clip_grad_norm=broken)


# ----- lora
class LoRAScalingAlpha(LoRALinear):
    """s = α instead of α/r (or α/√r)."""

    def __init__(self, base, r, alpha, *args, **kwargs):
        super().__init__(base, r, alpha, *args, **kwargs)
        self.scaling = float(alpha)


class LoRARandomB(LoRALinear):
    """B initialised uniformly at random like A: the adapted model no longer starts as the base."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_B.weight.data[...] = np.random.default_rng(0).uniform(-0.5, 0.5, self.lora_B.weight.shape)


class LoRAMergeUnscaled(LoRALinear):
    """merge() adds BA, forgetting the scaling s (the unmerged forward stays right)."""

    def delta_weight(self):
        return self.lora_B.weight.data.astype(np.float64) @ self.lora_A.weight.data.astype(np.float64)


class LoRABaseTrainable(LoRALinear):
    """The base weight is left trainable: it receives a gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.requires_grad = True


def lora_with(cls):
    return lambda: SimpleNamespace(LoRALinear=cls)


# ----- sft
def sft_with(**overrides):
    from tinysft.verify.sft import _sft
    return SimpleNamespace(**{**vars(_sft()), **overrides})


def _head_loss(model, batch, targets):
    inputs = {k: batch[k] for k in causal_lm.MODEL_INPUTS if batch.get(k) is not None}
    hidden = model.hidden_states(batch["input_ids"], **inputs)
    return F.linear_cross_entropy(hidden, model.output_weight, targets, reduction="sum")


def sft_loss_unshifted(model, batch):
    """Position t trained on its own label (no shift): the model learns to copy its input."""
    labels = np.where(np.asarray(batch["attention_mask"], bool), batch["labels"], -100)
    return _head_loss(model, batch, labels)


def sft_loss_shift_two(model, batch):
    """Position t trained on labels[t + 2]: the shift off by one the other way."""
    targets = np.full(batch["labels"].shape, -100)
    targets[:, :-1] = causal_lm.shifted_targets(batch)[:, 1:]
    return _head_loss(model, batch, targets)


def sft_eos_masked_by_id(model, batch):
    """Targets equal to the pad id ignored: the eos (= pad) is never learned, the model never stops."""
    targets = causal_lm.shifted_targets(batch)
    return _head_loss(model, batch, np.where(targets == 2, -100, targets))


def sft_count_eos_by_id(batch):
    targets = causal_lm.shifted_targets(batch)
    return int(((targets != -100) & (targets != 2)).sum())


def sft_micro_batch_mean(model, batch):
    """Each micro-batch's own mean (the Trainer then divides by 1 per micro-batch: the mean of means)."""
    return causal_lm.causal_lm_loss_sum(model, batch) * (1.0 / causal_lm.count_supervised(batch))


def sft_packed_without_segments(model, batch):
    """Packed rows run without their segment ids: examples attend to the ones before them."""
    return causal_lm.causal_lm_loss_sum(model, {k: v for k, v in batch.items() if k != "segment_ids"})


def sft_pack_positions_continue(encoded, max_length):
    """Packed rows whose position ids run on over the whole row instead of restarting per example."""
    from tinysft.data.sft import pack_examples
    rows = pack_examples(encoded, max_length)
    for row in rows:
        row["position_ids"] = np.arange(len(row["input_ids"]))
    return rows


def lce_dw_last_chunk(hidden, weight, target, ignore_index=-100, reduction="mean", chunk_size=None):
    """Right loss and dh, but dW of the last chunk only (overwritten, not accumulated, over chunks)."""
    right = F.linear_cross_entropy(hidden, weight, target, ignore_index, reduction, chunk_size)
    target = np.asarray(target).reshape(-1)
    rows = np.flatnonzero(target != ignore_index)
    last = rows[(len(rows) - 1) // chunk_size * chunk_size:]
    scale = 1.0 / len(rows) if reduction == "mean" else 1.0
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    wrong = (F.linear_cross_entropy(hidden, weight.detach(), target, ignore_index, reduction, chunk_size)
             + F.linear_cross_entropy(flat[last], weight, target[last], reduction="sum") * scale)
    return value_of(right, wrong)


# check name -> [(description, factory of the broken implementation)]
MUTANTS = {
    "cross_entropy": [("gradient missing 1/N", lambda: ce_grad_missing_mean)],
    "cross_entropy_smoothing_ignore": [("mean over all N rows, ignored included", lambda: ce_mean_over_all_rows),
                                       ("label smoothing ignored", lambda: ce_smoothing_ignored),
                                       ("gradient missing 1/|V|", lambda: ce_grad_missing_mean)],
    "mse": [("gradient (x − y)/n, missing the 2", lambda: mse_grad_missing_2)],
    "sgd": [("gradient ascent θ + η∇L", lambda: SGDAscent)],
    "sgd_momentum": [("momentum ignored", lambda: SGDNoMomentum)],
    "sgd_nesterov": [("nesterov flag ignored (heavy ball)", lambda: SGDNesterovIgnored)],
    "adam": [("no bias correction", lambda: AdamNoBiasCorrection)],
    "adamw": [("decay added to the gradient (coupled)", lambda: adamw_coupled),
              ("no bias correction", lambda: (lambda ps, **kw: AdamNoBiasCorrection(ps, decoupled=True, **kw)))],
    "l1_penalty": [("smoothed |θ|", lambda: l1_smoothed)],
    "l2_penalty": [("gradient λθ instead of 2λθ", lambda: l2_gradient_lambda),
                   ("(λ/2)Σθ²", lambda: l2_half)],
    "l2sp_penalty": [("pulls towards 0, not θ₀", lambda: l2sp_towards_zero)],
    "decay_sgd_coincide": [("decay 2λθ", lambda: {"SGD": SGDDecayTwice, "penalty_loss": penalty_loss})],
    "decay_adam_differ": [("AdamW coupled like Adam", lambda: {"Adam": Adam, "AdamW": adamw_coupled})],
    "dropout_mean": [("no 1/(1−p) rescaling", lambda: dropout_no_rescale),
                     ("rescales in eval mode too", lambda: dropout_rescale_in_eval)],
    "dropout_variance": [("drops with p/2 (mean right, variance wrong)", lambda: dropout_half_rate),
                         ("no 1/(1−p) rescaling", lambda: dropout_no_rescale)],
    "dropout_schedule": [("rates applied top to bottom", lambda: schedule_top_down),
                         ("attention probabilities keep the built rate", lambda: schedule_hidden_only)],
    "clip_grad_norm": [("always scales by c/‖g‖", lambda: clip_always_scale),
                       ("clips each tensor separately", lambda: clip_per_tensor)],
    "clip_grad_value": [("clamps only from above", lambda: clip_value_upper_only)],
    "softmax_stability": [("naive log Σ e^x", unstable_functional)],
    "layer_norm": [("n − 1 variance", lambda: functional_with(layer_norm=layer_norm_unbiased)),
                   ("backward without the mean/variance terms",
                    lambda: functional_with(layer_norm=layer_norm_backward_no_projection))],
    "gelu": [("tanh approximation as exact", lambda: functional_with(gelu=gelu_tanh_for_exact)),
             ("gradient Φ(x) only", lambda: functional_with(gelu=gelu_grad_missing_x_phi))],
    "rms_norm": [("ε outside the square root", lambda: decoder_functional(rms_norm=rms_norm_eps_outside_root)),
                 ("mean subtracted (LayerNorm)", lambda: decoder_functional(rms_norm=rms_norm_centred)),
                 ("backward with r held constant", lambda: decoder_functional(rms_norm=rms_norm_backward_constant_scale))],
    "rope_rotation": [("adjacent pairs (GPT-J layout)", lambda: decoder_functional(rope=rope_interleaved)),
                      ("θ_i = base^(−i/D)", lambda: decoder_functional(rope_cache=rope_cache_half_frequencies)),
                      ("rotation by −pθ", lambda: decoder_functional(rope=rope_backwards_angle)),
                      ("gradient rotated forwards", lambda: decoder_functional(rope=rope_backward_forward_rotation)),
                      ("sinusoid added, not rotated", lambda: decoder_functional(rope=rope_absolute_sinusoid))],
    "swiglu": [("σ(a)·u gate (GLU)", lambda: decoder_functional(swiglu=swiglu_sigmoid_gate)),
               ("∂/∂a without the product rule", lambda: decoder_functional(swiglu=swiglu_grad_missing_product_rule))],
    "causal_attention": [("mask off by one (sees the next key)", lambda: decoder_functional(causal_mask=causal_mask_sees_next)),
                         ("mask ignored", lambda: decoder_functional(attention=attention_mask_ignored)),
                         ("kv head h mod Hkv", lambda: decoder_functional(attention=attention_kv_heads_tiled)),
                         ("softmax denominator constant in backward",
                          lambda: decoder_functional(attention=attention_softmax_denominator_constant))],
    "kernel_cross_entropy": [("label smoothing dropped", kernel_ce_smoothing_dropped),
                             ("row_scale forced to 1 (sum, not mean)", kernel_ce_no_row_scale)],
    "kernel_clip_grad_norm": [("always scales by c/‖g‖", kernel_clip_always_scale),
                              ("scales a non-finite norm", kernel_clip_nonfinite_scaled)],
    "layerwise_lr_decay": [("decay^(depth+1)", lambda: prepare_decay_off_by_one),
                           ("depth counted from the bottom", lambda: prepare_decay_bottom_up)],
    "fisher_scaling": [("Fisher of the summed batch loss", lambda: fisher_impls(fisher_diagonal=fisher_of_summed_loss)),
                       ("(mean gradient)² instead of mean(gradient²)",
                        lambda: fisher_impls(fisher_diagonal=fisher_square_of_mean)),
                       ("normalised by the mean importance",
                        lambda: fisher_impls(prepare=prepare_fisher_mean_normalised))],
    "distillation": [("without T²", lambda: kd_without_t2),
                     ("KL(p_s ‖ p_t) instead of KL(p_t ‖ p_s)", lambda: kd_swapped_kl),
                     ("gradient reaches the teacher", lambda: kd_teacher_not_detached)],
    "lora_merge": [("scaling α instead of α/r", lora_with(LoRAScalingAlpha)),
                   ("B initialised random", lora_with(LoRARandomB)),
                   ("merge forgets the scaling", lora_with(LoRAMergeUnscaled))],
    "lora_gradients": [("scaling α instead of α/r", lora_with(LoRAScalingAlpha)),
                       ("base weight left trainable", lora_with(LoRABaseTrainable))],
    "sft_masked_loss": [("no shift (t predicts labels[t])", lambda: sft_with(loss_sum=sft_loss_unshifted)),
                        ("shift by two", lambda: sft_with(loss_sum=sft_loss_shift_two)),
                        ("eos masked by its id (= pad)",
                         lambda: sft_with(loss_sum=sft_eos_masked_by_id, count=sft_count_eos_by_id))],
    "sft_accumulation": [("per-micro-batch mean instead of the step's count",
                          lambda: sft_with(loss_sum=sft_micro_batch_mean, count=lambda batch: 1))],
    "sft_packing": [("packing without the segment mask", lambda: sft_with(loss_sum=sft_packed_without_segments)),
                    ("position ids not restarted per example", lambda: sft_with(pack=sft_pack_positions_continue))],
    "sft_linear_cross_entropy": [("dW of the last chunk only (not accumulated)",
                                  lambda: sft_with(linear_cross_entropy=lce_dw_last_chunk))],
}

KERNEL_CHECKS = ("kernel_cross_entropy", "kernel_clip_grad_norm")

__all__ = ["KERNEL_CHECKS", "MUTANTS"]
