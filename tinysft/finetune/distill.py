"""Knowledge distillation: train a student on a frozen teacher's softened predictions.

For student logits z_s, teacher logits z_t (rows of C classes), temperature T
and weight α, with p_s = softmax(z_s/T), p_t = softmax(z_t/T)::

    loss = α · T² · KL(p_t ‖ p_s) + (1 − α) · CE(z_s, y)
    KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c)

both terms averaged over the labelled rows (label != ignore_index; every row
when ``labels`` is None, which needs α = 1). The teacher is a constant: its
logits are computed under ``no_grad`` and no gradient reaches it.

Gradient. For one row, ∂KL/∂z_s = (p_s − p_t)/T, so the gradient of the
distillation term T²·KL with respect to z_s is **T·(p_s − p_t)** per example;
averaged over N rows it is T·(p_s − p_t)/N, and the whole loss gives

    ∂loss/∂z_s = α·T·(p_s − p_t)/N + (1 − α)·(softmax(z_s) − onehot(y))/N,

zero on the ignored rows. The T² factor keeps the soft term's gradient on the scale
of the hard term's as T grows (Hinton et al. 2015). ``kd_loss`` is one fused op over
the logits, its forward and backward side by side (``_kd_rows``); ``linear_kd_loss``
is the same per row for a decoder, from the hidden states: the (tokens × V) logits of
student and teacher are made a chunk of supervised rows at a time and never held whole.

    trainer = distill(student, teacher, train_loader, AdamW(student.parameters(), lr=1e-4),
                      temperature=2.0, alpha=0.5, epochs=3, eval_loader=dev_loader)

The student. ``student_from_teacher`` builds a shallower copy of a BERT classifier, as
DistilBERT was made from BERT, or of a Llama decoder: the same embeddings, the teacher's
layers ``layers`` (by default every other one from the bottom: 0, 2, 4 of 6) as its layers
0, 1, 2, ..., and the teacher's head (a decoder's final norm and, tied or not, output
head); every tensor copied, the teacher unchanged.
"""
import dataclasses

import numpy as np

from .. import functional as F
from ..backend import device_of, xp_for
from ..tensor import Tensor, is_grad_enabled, lift, make_node, no_grad
from .batch import forward, labels_of
from .causal_lm import MODEL_INPUTS, shifted_targets

__all__ = ["kd_loss", "linear_kd_loss", "DistillationLoss", "distill", "student_from_teacher", "every_other_layer"]


def _check_kd(temperature, alpha, reduction, labelled: bool, op: str) -> None:
    if not temperature > 0 or not 0 <= alpha <= 1:
        raise ValueError(f"{op}: need temperature > 0 and alpha in [0, 1], got {temperature} and {alpha}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not labelled and alpha < 1:
        raise ValueError(f"{op} without labels needs alpha=1 (no hard-label term)")


def _kd_rows(z_s, z_t, target, temperature: float, alpha: float, row_scale):
    """Losses (c,) and row_scale · ∂loss/∂z_s (c, C) of a block of rows that all count.

    z_s, z_t (c, C) logits; z_t's buffer is overwritten (it becomes the gradient) and z_s is
    read only; target (c,) class ids, read only when α < 1; row_scale a float or (c,). One
    more (c, C) buffer, P, and per row, with a = z_t/T − max, b = z_s/T − max (so Σ p_t = 1):

        p_t  = e^a / Σe^a                                             (P)
        KL   = Σ p_t·a − log Σe^a − Σ p_t·b + log Σe^b                = Σ p_t (log p_t − log p_s)
        CE   = log Σ e^(z_s − m) + m − z_s,y                          (m = max z_s)
        loss = α·T²·KL + (1 − α)·CE
        grad = α·T·(p_s − p_t) + (1 − α)·(softmax(z_s) − onehot(y))   (in z_t's buffer), × row_scale
    """
    xp = xp_for(device_of(z_s))
    count = z_s.shape[0]
    index = xp.arange(count)
    a = z_t
    a /= temperature
    a -= a.max(axis=1, keepdims=True)
    p_t = xp.exp(a)  # P (c, C)
    sum_t = p_t.sum(axis=1)  # (c,)
    p_t /= sum_t[:, None]
    kl = xp.einsum("ij,ij->i", p_t, a) - xp.log(sum_t)  # Σ p_t log p_t (c,)
    b = xp.divide(z_s, temperature, out=a)  # a's buffer from here on
    b -= b.max(axis=1, keepdims=True)
    kl -= xp.einsum("ij,ij->i", p_t, b)
    xp.exp(b, out=b)
    sum_s = b.sum(axis=1)
    kl += xp.log(sum_s)
    b /= sum_s[:, None]  # p_s
    b -= p_t
    b *= alpha * temperature  # the soft term's gradient
    loss = (alpha * temperature * temperature) * kl
    if alpha < 1:
        peak = z_s.max(axis=1, keepdims=True)  # (c, 1)
        hard = xp.subtract(z_s, peak, out=p_t)
        xp.exp(hard, out=hard)
        sum_h = hard.sum(axis=1)
        loss += (1 - alpha) * (xp.log(sum_h) + peak[:, 0] - z_s[index, target])
        hard /= sum_h[:, None]  # softmax(z_s)
        hard[index, target] -= 1
        hard *= 1 - alpha
        b += hard
    b *= row_scale if isinstance(row_scale, float) else row_scale[:, None]
    return loss, b


def _teacher_array(teacher, like: Tensor):
    """The teacher's values as a constant array of ``like``'s dtype (no gradient reaches a Tensor)."""
    data = teacher.data if isinstance(teacher, Tensor) else teacher
    return like.xp.asarray(data, dtype=like.dtype)


def kd_loss(student_logits: Tensor, teacher_logits, labels=None, temperature: float = 2.0, alpha: float = 0.5,
            ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y) over the rows whose label is
    not ``ignore_index``; see the module docstring. One fused op (``_kd_rows``).

    student_logits (..., C), teacher_logits (..., C) (a constant), labels (...) or None;
    ``reduction="sum"`` sums over the labelled rows instead of averaging ("mean" over none is
    NaN with a zero gradient). Ignored rows get exactly zero gradient.
    """
    _check_kd(temperature, alpha, reduction, labels is not None, "kd_loss")
    classes = student_logits.shape[-1]
    teacher = _teacher_array(teacher_logits, student_logits)
    if teacher.shape != student_logits.shape:
        raise F.ShapeError(f"kd_loss: teacher logits of shape {teacher.shape} for student logits of shape "
                           f"{student_logits.shape}")
    xp = student_logits.xp
    z_s = student_logits.data.reshape(-1, classes)  # (N, C)
    if labels is None:
        target, valid = None, xp.ones(z_s.shape[0], dtype=bool)
    else:
        target, valid = F._class_targets(labels, student_logits.shape[:-1], classes, ignore_index, xp,
                                         f"kd_loss: student logits of shape {student_logits.shape}")
    rows = xp.flatnonzero(valid)  # (n,) the rows that count
    count = int(rows.size)
    scale = 1.0 / count if reduction == "mean" and count else 1.0
    losses, grad = _kd_rows(z_s[rows], teacher.reshape(-1, classes)[rows], None if target is None else target[rows],
                            float(temperature), float(alpha), scale)  # (n,), (n, C)
    value = losses.sum() * scale if count or reduction == "sum" else np.nan
    out = make_node(xp.asarray(value, dtype=z_s.dtype), (student_logits,), "kd_loss")
    if out.requires_grad:
        def backward_fn(g):
            full = xp.zeros_like(z_s)  # (N, C): zero on the ignored rows
            full[rows] = grad * g
            student_logits.accumulate_grad(full.reshape(student_logits.shape), owned=True)
        out.backward_fn = backward_fn
    return out


def linear_kd_loss(hidden: Tensor, weight: Tensor, teacher_hidden, teacher_weight, target, temperature: float = 2.0,
                   alpha: float = 0.5, ignore_index: int = -100, reduction: str = "sum",
                   chunk_size: int = None) -> Tensor:
    """``kd_loss(linear(hidden, weight), linear(teacher_hidden, teacher_weight), target, ...)`` without
    ever holding the (N, V) logits of either model.

    hidden (..., D), weight (V, D): the student's final hidden states and head; teacher_hidden
    (..., D_t), teacher_weight (V, D_t): the teacher's, constants; target (...) class ids. Only
    the n rows whose target is not ``ignore_index`` are computed, ``chunk_size`` at a time
    (default: as many as fill ``F.HEAD_CHUNK_BYTES`` of logits). For a chunk C of rows:

        z_s = h_C Wᵀ,  z_t = h_t,C W_tᵀ  (c, V);   loss_C, G_C = _kd_rows(z_s, z_t, t_C, s)
        dh_C = G_C W  (c, D);   dW += G_Cᵀ h_C  (V, D)

    with s = g/n for "mean" and g for "sum" (g the upstream gradient). Ignored rows get dh = 0
    and add nothing to dW. Memory: three (c, V) buffers at a time (z_s, z_t → G_C, P), plus dh
    and dW, the sizes of the inputs. The gradients are computed in the forward pass with g = 1
    and scaled in the first backward; a second backward runs the chunks again.
    """
    _check_kd(temperature, alpha, reduction, True, "linear_kd_loss")
    weight = lift(weight, hidden)
    xp = hidden.xp
    teacher_h = _teacher_array(teacher_hidden, hidden)
    teacher_w = _teacher_array(teacher_weight, hidden)
    classes, width = weight.shape if weight.ndim == 2 else (None, None)
    if (width is None or hidden.shape[-1] != width or teacher_w.ndim != 2 or teacher_w.shape[0] != classes
            or teacher_h.shape[:-1] != hidden.shape[:-1] or teacher_h.shape[-1] != teacher_w.shape[1]):
        raise F.ShapeError(f"linear_kd_loss: need hidden (..., D), weight (V, D), teacher_hidden (..., D_t) and "
                           f"teacher_weight (V, D_t), got {hidden.shape}, {weight.shape}, {teacher_h.shape} and "
                           f"{teacher_w.shape}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_kd_loss: hidden is {hidden.dtype} but weight is {weight.dtype}")
    chunk_size = F.head_chunk_size(chunk_size, classes, hidden.data.itemsize, "linear_kd_loss")
    flat, teacher_flat = hidden.data.reshape(-1, width), teacher_h.reshape(-1, teacher_w.shape[1])  # (N, D), (N, D_t)
    target, valid = F._class_targets(target, hidden.shape[:-1], classes, ignore_index, xp,
                                     f"linear_kd_loss: hidden of shape {hidden.shape}")
    rows = xp.flatnonzero(valid)  # (n,) the only rows computed
    count = int(rows.size)
    scale = 1.0 / count if reduction == "mean" and count else 1.0

    def block_loss(z, chosen, row_scale):  # z: the student's logits of the chunk (c, V)
        return _kd_rows(z, teacher_flat[chosen] @ teacher_w.T, target[chosen], float(temperature), float(alpha),
                        row_scale)

    def run_chunks(row_scale, with_grad):
        return F.head_chunks(hidden, weight, rows, chunk_size, block_loss, row_scale, with_grad)

    precompute = is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    losses, *gradients = run_chunks(scale, precompute)
    value = losses.sum() * scale if count or reduction == "sum" else np.nan
    return F.head_loss_node(xp.asarray(value, dtype=flat.dtype), hidden, weight, "linear_kd_loss",
                            gradients if precompute else None, lambda g: run_chunks(float(g) * scale, True)[1:])


class DistillationLoss:
    """A Trainer ``loss_fn``: the summed KD loss of the student on a batch, teacher frozen.

    The teacher is put in eval mode with ``requires_grad`` off for its parameters
    and runs under ``no_grad``. The Trainer divides by the number of labelled rows
    (its ``count_fn``). A classifier's batch gives logits and labels (``kd_loss``); a
    causal decoder's (one with ``hidden_states`` and ``output_weight``, an SFT batch)
    gives its final hidden states and, as targets, the next position's labels
    (``causal_lm.shifted_targets``: the one-position shift of the SFT loss), so the loss
    runs over the vocabulary at the supervised positions only (``linear_kd_loss``).
    """

    def __init__(self, teacher, temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100):
        self.teacher, self.temperature, self.alpha, self.ignore_index = teacher, temperature, alpha, ignore_index
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
            p.grad = None

    def __call__(self, student, batch) -> Tensor:
        if hasattr(student, "hidden_states"):
            inputs = {key: np.asarray(batch[key]) for key in MODEL_INPUTS if batch.get(key) is not None}
            ids = np.asarray(batch["input_ids"])
            with no_grad():
                teacher_hidden = self.teacher.hidden_states(ids, **inputs)  # (B, T, D_t)
            return linear_kd_loss(student.hidden_states(ids, **inputs), student.output_weight, teacher_hidden,
                                  self.teacher.output_weight, shifted_targets(batch), self.temperature, self.alpha,
                                  self.ignore_index, reduction="sum")
        with no_grad():
            teacher_logits = forward(self.teacher, batch)
        return kd_loss(forward(student, batch), teacher_logits, labels_of(batch), self.temperature, self.alpha,
                       self.ignore_index, reduction="sum")


def distill(student, teacher, train_loader, optimizer, temperature: float = 2.0, alpha: float = 0.5,
            ignore_index: int = -100, **trainer_kwargs):
    """Train ``student`` against ``teacher`` with the KD loss; returns the fitted Trainer.

    Evaluation (if ``eval_loader`` is given) scores the student alone with plain
    cross-entropy, accuracy and macro-F1.
    """
    from .trainer import Trainer
    loss_fn = DistillationLoss(teacher, temperature, alpha, ignore_index)
    trainer = Trainer(student, optimizer, train_loader, loss_fn=loss_fn, ignore_index=ignore_index,
                      **trainer_kwargs)
    trainer.fit()
    return trainer


def every_other_layer(num_layers: int) -> list:
    """Layers 0, 2, 4, ... of a ``num_layers``-layer encoder: DistilBERT's choice of student layers."""
    return list(range(0, num_layers, 2))


def student_from_teacher(teacher, layers=None):
    """A shallower copy of ``teacher`` (a BertForSequenceClassification or a LlamaForCausalLM) whose
    layer j is a copy of the teacher's layer ``layers[j]`` (default ``every_other_layer``), its
    dropout rates included, with copies of the embeddings and the head (and a decoder's final
    norm); in training mode."""
    from ..models.bert import BertForSequenceClassification
    from ..models.llama import LlamaForCausalLM
    decoder = isinstance(teacher, LlamaForCausalLM)
    config = teacher.config if decoder else teacher.bert.config
    layers = every_other_layer(config.num_hidden_layers) if layers is None else [int(i) for i in layers]
    if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < config.num_hidden_layers:
        raise ValueError(f"student layers must be increasing layer numbers of the teacher's 0..."
                         f"{config.num_hidden_layers - 1}, got {layers}")
    shape = dataclasses.replace(config, num_hidden_layers=len(layers))
    if decoder:
        student, prefix = LlamaForCausalLM(shape), "model.layers."
        student.astype(teacher.output_weight.dtype)
    else:
        student = BertForSequenceClassification(shape, teacher.num_labels, teacher.pooling, teacher.head.dropout.p,
                                                teacher.use_pooler)
        student.astype(teacher.bert.embeddings.word_embeddings.weight.dtype)
        prefix = "bert.encoder.layer."
    renumber = {f"{prefix}{old}.": f"{prefix}{new}." for new, old in enumerate(layers)}
    state = {}
    for name, value in teacher.state_dict().items():  # copies
        if not name.startswith(prefix):
            state[name] = value
            continue
        layer = name[:name.index(".", len(prefix)) + 1]  # "bert.encoder.layer.4."
        if layer in renumber:
            state[renumber[layer] + name[len(layer):]] = value
    student.load_state_dict(state)
    if not decoder:
        for new_layer, old in zip(student.bert.encoder.layer, layers):  # each layer keeps its dropout rates
            rates = teacher.bert.encoder.layer[old].dropouts()
            for name, module in new_layer.dropouts().items():
                module.p = rates[name].p
    return student.train()
