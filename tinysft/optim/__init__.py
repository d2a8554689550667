"""Optimizers, learning-rate schedules, gradient clipping and weight penalties.

PyTorch names and semantics: ``param_groups`` is a list of dicts, schedules and
per-layer rates are edits to them; ``state_dict()`` / ``load_state_dict()``
resume training exactly.
"""
from .adam import Adam, AdamW
from .clip import NonFiniteNormError, clip_grad_norm_, clip_grad_value_
from .groups import NO_DECAY, param_groups_with_decay
from .optimizer import Optimizer
from .regularization import PENALTIES, penalty_loss, snapshot_anchor
from .schedules import (
           SCHEDULES,
           ConstantSchedule,
           CosineSchedule,
           LinearSchedule,
           LRSchedule,
           SlantedTriangular,
           schedule_by_name,
)
from .sgd import SGD

OPTIMIZERS = {"adamw": AdamW, "adam": Adam, "sgd": SGD}


def optimizer_by_name(name: str, params, **hyper):
    """``OPTIMIZERS[name](params, **hyper)``, with a clear error for an unknown name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **hyper)

__all__ = [
           "OPTIMIZERS",
           "optimizer_by_name",
           "NO_DECAY",
           "PENALTIES",
           "SCHEDULES",
           "SGD",
           "Adam",
           "AdamW",
           "ConstantSchedule",
           "CosineSchedule",
           "LRSchedule",
           "LinearSchedule",
           "NonFiniteNormError",
           "Optimizer",
           "SlantedTriangular",
           "clip_grad_norm_",
           "clip_grad_value_",
           "param_groups_with_decay",
           "penalty_loss",
           "schedule_by_name",
           "snapshot_anchor",
]
