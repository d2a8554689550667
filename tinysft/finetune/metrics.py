"""Classification metrics on integer predictions and labels (NumPy arrays or lists).

    accuracy     = #(pred == label) / n
    per class c:   F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)
    macro-F1     = mean of F1_c over the classes

The classes averaged over are those that occur in the labels or the predictions
(scikit-learn's ``f1_score(average="macro")``), or ``range(num_classes)`` when
given; a class with no example and no prediction then has F1 = 0 (scikit-learn's
``zero_division=0``). Positions whose label is ``ignore_index`` are dropped.

>>> accuracy([0, 1, 1, 2], [0, 1, 2, 2])
0.75
>>> round(macro_f1([0, 1, 1, 2], [0, 1, 2, 2]), 4)   # F1 = 1, 2/3, 2/3
0.7778
"""
import numpy as np

__all__ = ["accuracy", "confusion_matrix", "macro_f1", "f1_per_class", "classification_metrics"]


def _clean(pred, labels, ignore_index):
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions of shape {pred.shape} and labels of shape {labels.shape} differ")
    keep = labels != ignore_index
    return pred[keep].astype(np.int64), labels[keep].astype(np.int64)


def accuracy(pred, labels, ignore_index: int = -100) -> float:
    """Fraction of (non-ignored) positions where ``pred == labels``; nan when there are none."""
    pred, labels = _clean(pred, labels, ignore_index)
    return float((pred == labels).mean()) if labels.size else float("nan")


def confusion_matrix(pred, labels, num_classes: int, ignore_index: int = -100) -> np.ndarray:
    """``M[t, p]`` = number of examples of true class t predicted as p, shape (C, C)."""
    pred, labels = _clean(pred, labels, ignore_index)
    out_of_range = (pred < 0) | (pred >= num_classes) | (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        raise ValueError(f"a class id lies outside [0, {num_classes})")
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def f1_per_class(pred, labels, num_classes: int | None = None, ignore_index: int = -100):
    """``(classes, f1)``: the classes averaged over and each one's F1 (see the module docstring)."""
    pred, labels = _clean(pred, labels, ignore_index)
    if num_classes is None:
        classes = np.union1d(pred, labels)
        size = int(classes.max()) + 1 if classes.size else 0
    else:
        classes, size = np.arange(num_classes), num_classes
    m = confusion_matrix(pred, labels, size, ignore_index=ignore_index) if size else np.zeros((0, 0), np.int64)
    tp = np.diag(m)[classes]
    fp = m.sum(axis=0)[classes] - tp
    fn = m.sum(axis=1)[classes] - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return classes, f1


def macro_f1(pred, labels, num_classes: int | None = None, ignore_index: int = -100) -> float:
    """Unweighted mean of the per-class F1 scores; nan when there is no example."""
    _, f1 = f1_per_class(pred, labels, num_classes, ignore_index)
    return float(f1.mean()) if f1.size else float("nan")


def classification_metrics(logits, labels, num_classes: int | None = None, ignore_index: int = -100) -> dict:
    """``{"accuracy", "macro_f1"}`` of the argmax of ``logits`` (N, C) against ``labels`` (N,)."""
    pred = np.asarray(logits).argmax(axis=-1)
    return {"accuracy": accuracy(pred, labels, ignore_index),
            "macro_f1": macro_f1(pred, labels, num_classes, ignore_index)}
