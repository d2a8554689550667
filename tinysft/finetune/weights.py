"""Copy a model's parameters out and back in place (checkpoints, best-weights snapshots).

Only parameters (``named_parameters()``) are saved: tinysft modules keep no
other state. Restoring writes into the existing arrays, so an optimizer that
holds the parameters, and any view of them, sees the restored values.
"""
import numpy as np

from ..backend import to_device

__all__ = ["get_weights", "set_weights"]


def get_weights(model) -> dict:
    """``{name: NumPy copy}`` of every parameter."""
    return {name: np.array(to_device(p.data, "cpu"), copy=True) for name, p in model.named_parameters()}


def set_weights(model, weights: dict) -> None:
    """Write ``weights`` into the parameters in place; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        value = np.asarray(weights[name])
        if value.shape != p.data.shape:
            raise ValueError(f"{name}: saved shape {value.shape}, parameter shape {p.data.shape}")
        p.data[...] = to_device(value.astype(p.data.dtype, copy=False), p.device)
