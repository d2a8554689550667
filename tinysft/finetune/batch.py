"""How the fine-tuning code reads a batch and calls a model.

A batch is either a dict (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``;
the labels under ``"labels"`` or ``"label"``, everything else passed to the
model as keyword arguments) or a tuple ``(inputs, labels)``. A model returns
logits as a Tensor, or an object with ``.logits``, or a tuple whose first item
is the logits. Pass your own ``forward``/``loss_fn`` to the Trainer for
anything else.
"""
import numpy as np

from .. import functional as F
from ..tensor import Tensor

__all__ = ["LABEL_KEYS", "split_batch", "forward", "labels_of", "count_examples", "cross_entropy_sum"]

LABEL_KEYS = ("labels", "label")


def split_batch(batch):
    """``(inputs, labels)``; inputs is a dict of keyword arguments or a single positional input."""
    if isinstance(batch, dict):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, (batch[key] if key is not None else None)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be a dict with a 'labels' key or an (inputs, labels) pair, "
                    f"got {type(batch).__name__}")


def logits_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def forward(model, batch) -> Tensor:
    """The model's logits for ``batch`` (labels are not passed to the model)."""
    inputs, _ = split_batch(batch)
    return logits_of(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def labels_of(batch) -> np.ndarray:
    _, labels = split_batch(batch)
    if labels is None:
        raise KeyError("the batch has no labels (expected a 'labels' key)")
    return np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels)


def count_examples(batch, ignore_index: int = -100) -> int:
    """Number of labelled positions (label != ignore_index): a batch's weight in a mean loss."""
    return int((labels_of(batch) != ignore_index).sum())


def cross_entropy_sum(model, batch, ignore_index: int = -100, label_smoothing: float = 0.0) -> Tensor:
    """Σ over labelled positions of the cross-entropy (the Trainer divides by the full batch's count)."""
    logits = forward(model, batch)
    labels = labels_of(batch)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="sum")
