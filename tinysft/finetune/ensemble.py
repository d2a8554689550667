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

__all__ = ["ensemble_predict", "evaluate_ensemble", "softmax_np"]


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_predict(models, loader, method: str = "mean") -> dict:
    """``{"pred": (N,), "labels": (N,) or None, "probs": (N, C) (mean only), "member_probs": (K, N, C)}``."""
    if method not in ("mean", "vote"):
        raise ValueError(f"method must be 'mean' or 'vote', got {method!r}")
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
    out = {"member_probs": member_probs, "labels": np.concatenate(labels) if labels else None}
    if method == "mean":
        out["probs"] = member_probs.mean(axis=0)
        out["pred"] = out["probs"].argmax(axis=-1)
    else:
        votes = member_probs.argmax(axis=-1)  # (K, N)
        classes = member_probs.shape[-1]
        counts = np.stack([(votes == c).sum(axis=0) for c in range(classes)], axis=-1)  # (N, C)
        out["pred"] = counts.argmax(axis=-1)  # first maximum: the smallest class id wins a tie
    return out


def evaluate_ensemble(models, loader, method: str = "mean", num_classes: int | None = None,
                      ignore_index: int = -100) -> dict:
    """Accuracy and macro-F1 of the ensemble and of each member; with "mean" also the NLL
    of the averaged probabilities (``loss``)."""
    out = ensemble_predict(models, loader, method)
    labels = out["labels"]
    if labels is None:
        raise KeyError("evaluate_ensemble needs batches with labels")
    result = {"accuracy": accuracy(out["pred"], labels, ignore_index),
              "macro_f1": macro_f1(out["pred"], labels, num_classes, ignore_index)}
    keep = labels != ignore_index
    if method == "mean" and keep.any():
        picked = out["probs"][keep, labels[keep]]
        result["loss"] = float(-np.log(np.maximum(picked, 1e-300)).mean())
    result["members"] = [{"accuracy": accuracy(p.argmax(-1), labels, ignore_index),
                          "macro_f1": macro_f1(p.argmax(-1), labels, num_classes, ignore_index)}
                         for p in out["member_probs"]]
    return result
