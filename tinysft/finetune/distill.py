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

    ∂loss/∂z_s = α·T·(p_s − p_t)/N + (1 − α)·(softmax(z_s) − onehot(y))/N.

The T² factor keeps the soft term's gradient on the scale of the hard term's
as T grows (Hinton et al. 2015).

    trainer = distill(student, teacher, train_loader, AdamW(student.parameters(), lr=1e-4),
                      temperature=2.0, alpha=0.5, epochs=3, eval_loader=dev_loader)

The student. ``student_from_teacher`` builds a shallower copy of a BERT classifier, as
DistilBERT was made from BERT: the same embeddings, the teacher's encoder layers
``layers`` (by default every other one from the bottom: 0, 2, 4 of 6) as its layers
0, 1, 2, ..., and the teacher's head; every tensor copied, the teacher unchanged.
"""
import numpy as np

from .. import functional as F
from ..tensor import Tensor, no_grad
from .batch import forward, labels_of

__all__ = ["kd_loss", "DistillationLoss", "distill", "student_from_teacher", "every_other_layer"]


def _teacher_log_probs(teacher_logits, temperature):
    """log softmax(z_t / T) as a constant array, stable (max subtracted)."""
    z = teacher_logits.data if isinstance(teacher_logits, Tensor) else np.asarray(teacher_logits)
    z = z / temperature
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kd_loss(student_logits: Tensor, teacher_logits, labels=None, temperature: float = 2.0, alpha: float = 0.5,
            ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y); see the module docstring.

    ``reduction="sum"`` sums both terms over the labelled rows instead of averaging.
    """
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1], got {temperature} and {alpha}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if labels is None and alpha < 1:
        raise ValueError("kd_loss without labels needs alpha=1 (no hard-label term)")
    classes = student_logits.shape[-1]
    xp = student_logits.xp
    log_pt = xp.asarray(_teacher_log_probs(teacher_logits, temperature), dtype=student_logits.dtype)
    log_pt = log_pt.reshape(-1, classes)  # (N, C)
    p_t = xp.exp(log_pt)
    z_s = student_logits.reshape(-1, classes)  # (N, C)
    if labels is not None:
        labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels).reshape(-1)
        valid = labels != ignore_index
    else:
        valid = np.ones(z_s.shape[0], dtype=bool)
    count = int(valid.sum())
    weight = xp.asarray(valid, dtype=student_logits.dtype)  # (N,) 1 for the rows that count
    log_ps = F.log_softmax(z_s * (1.0 / temperature), axis=-1)  # (N, C)
    kl_rows = ((log_ps * -p_t).sum(axis=-1) + (p_t * log_pt).sum(axis=-1))  # (N,)
    kl = (kl_rows * weight).sum()
    loss = kl * (alpha * temperature * temperature)
    if alpha < 1:
        ce = F.cross_entropy(z_s, labels, ignore_index=ignore_index, reduction="sum")
        loss = loss + ce * (1.0 - alpha)
    if reduction == "mean":
        loss = loss * (1.0 / count if count else float("nan"))
    return loss


class DistillationLoss:
    """A Trainer ``loss_fn``: the summed KD loss of the student on a batch, teacher frozen.

    The teacher is put in eval mode with ``requires_grad`` off for its parameters
    and runs under ``no_grad``. The Trainer divides by the number of labelled rows.
    """

    def __init__(self, teacher, temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100):
        self.teacher, self.temperature, self.alpha, self.ignore_index = teacher, temperature, alpha, ignore_index
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
            p.grad = None

    def __call__(self, student, batch) -> Tensor:
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
    """A BertForSequenceClassification whose layer j is a copy of the teacher's layer ``layers[j]``
    (default ``every_other_layer``), its dropout rates included, with copies of its embeddings and
    head; in training mode."""
    import dataclasses

    from ..models.bert import BertForSequenceClassification
    config = teacher.bert.config
    layers = every_other_layer(config.num_hidden_layers) if layers is None else [int(i) for i in layers]
    if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < config.num_hidden_layers:
        raise ValueError(f"student layers must be increasing layer numbers of the teacher's 0..."
                         f"{config.num_hidden_layers - 1}, got {layers}")
    student = BertForSequenceClassification(dataclasses.replace(config, num_hidden_layers=len(layers)),
                                            teacher.num_labels, teacher.pooling, teacher.head.dropout.p,
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
    for new_layer, old in zip(student.bert.encoder.layer, layers):  # each layer keeps its dropout rates
        rates = teacher.bert.encoder.layer[old].dropouts()
        for name, module in new_layer.dropouts().items():
            module.p = rates[name].p
    return student.train()
