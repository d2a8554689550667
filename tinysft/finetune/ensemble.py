"""Ensembles of K fine-tuned models: averaged probabilities or a majority vote.

    mean:  p(c | x) = (1/K) Σ_k softmax(z_k(x))_c,  prediction argmax_c p(c | x)
    vote:  prediction = the class most models predict (ties: the smallest class id)

    result = evaluate_ensemble([model_a, model_b, model_c], dev_loader, method="mean")
    result["accuracy"], result["macro_f1"], result["members"][0]["accuracy"]

Every model runs in eval mode under ``no_grad``, on the same batches (the loader
is iterated once).
"""
import numpy as np

from ..tensor import no_grad
from .batch import forward, labels_of
from .metrics import accuracy, macro_f1

METHODS = ("mean", "vote")

__all__ = ["METHODS", "combine", "ensemble_metrics", "ensemble_predict", "evaluate_ensemble", "softmax_np"]


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_predict(models, loader, method: str = "mean") -> dict:
    """``{"pred": (N,), "labels": (N,) or None, "probs": (N, C) (mean only), "member_probs": (K, N, C)}``."""
    _check_method(method)  # before any model runs
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one model")
    modes = [getattr(m, "training", False) for m in models]
    for m in models:
        m.eval()
    member_probs, labels = [[] for _ in models], []
    try:
        with no_grad():
            for batch in loader:
                for k, m in enumerate(models):
                    logits = forward(m, batch).numpy()
                    member_probs[k].append(softmax_np(logits.reshape(-1, logits.shape[-1]).astype(np.float64)))
                if labels is not None:  # None once a batch had no labels
                    try:
                        labels.append(labels_of(batch).reshape(-1))
                    except KeyError:
                        labels = None
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    member_probs = np.stack([np.concatenate(p) for p in member_probs])  # (K, N, C)
    return {"member_probs": member_probs, "labels": np.concatenate(labels) if labels else None,
            **combine(member_probs, method)}


def combine(member_probs: np.ndarray, method: str = "mean") -> dict:
    """The ensemble of K members' probabilities (K, N, C): ``{"pred": (N,)}``, with "mean" also
    ``"probs"`` (N, C), the averaged probabilities."""
    if _check_method(method) == "mean":
        probs = member_probs.mean(axis=0)
        return {"probs": probs, "pred": probs.argmax(axis=-1)}
    votes = member_probs.argmax(axis=-1)  # (K, N)
    classes = member_probs.shape[-1]
    counts = np.stack([(votes == c).sum(axis=0) for c in range(classes)], axis=-1)  # (N, C)
    return {"pred": counts.argmax(axis=-1)}  # first maximum: the smallest class id wins a tie


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def evaluate_ensemble(models, loader, method: str = "mean", num_classes: int | None = None,
                      ignore_index: int = -100) -> dict:
    """Accuracy and macro-F1 of the ensemble and of each member; with "mean" also the NLL
    of the averaged probabilities (``loss``)."""
    out = ensemble_predict(models, loader, method)
    if out["labels"] is None:
        raise KeyError("evaluate_ensemble needs batches with labels")
    return ensemble_metrics(out["member_probs"], out["labels"], method, num_classes, ignore_index)


def ensemble_metrics(member_probs: np.ndarray, labels: np.ndarray, method: str = "mean",
                     num_classes: int | None = None, ignore_index: int = -100) -> dict:
    """``evaluate_ensemble``'s result from the members' probabilities (K, N, C) and the labels (N,)."""
    out = combine(member_probs, method)
    result = {"accuracy": accuracy(out["pred"], labels, ignore_index),
              "macro_f1": macro_f1(out["pred"], labels, num_classes, ignore_index)}
    keep = labels != ignore_index
    if method == "mean" and keep.any():
        picked = out["probs"][keep, labels[keep]]
        result["loss"] = float(-np.log(np.maximum(picked, 1e-300)).mean())
    result["members"] = [{"accuracy": accuracy(p.argmax(-1), labels, ignore_index),
                          "macro_f1": macro_f1(p.argmax(-1), labels, num_classes, ignore_index)}
                         for p in member_probs]
    return result
