"""Weight penalties added to the loss, chosen per parameter group.

A group opts in with two keys::

    {"params": [...], "penalty": "l1" | "l2" | "l2sp", "penalty_lambda": λ}

    l1    λ Σ |θ|            gradient λ·sign(θ), with sign(0) = 0 (the subgradient 0 at θ = 0)
    l2    λ Σ θ²             gradient 2λθ
    l2sp  λ Σ (θ − θ₀)²      gradient 2λ(θ − θ₀); θ₀ are the pretrained weights (Li et al. 2018)

``penalty_loss(optimizer)`` returns their sum as a Tensor expression, so the
training loop writes ``loss = task_loss + penalty_loss(opt)`` and autograd gives
the gradients. This is "L2 in the loss", unlike AdamW's decoupled decay.

For L2-SP, θ₀ is copied when the group joins the optimizer (build the optimizer
after loading the pretrained weights, or call ``snapshot_anchor`` then). The
copies live in the group under ``"penalty_anchor"``, so they travel with the
optimizer's ``state_dict``.
"""
import numpy as np

from ..backend import device_of, to_device
from ..tensor import Tensor

PENALTIES = ("l1", "l2", "l2sp")


def init_penalty(group: dict) -> None:
    """Check a group's penalty keys; for L2-SP snapshot θ₀ unless the group has one."""
    kind = group.get("penalty")
    if kind is None:
        return
    if kind not in PENALTIES:
        raise ValueError(f"unknown penalty {kind!r}; expected one of {PENALTIES} or None")
    lam = group.get("penalty_lambda")
    if lam is None or not lam >= 0:
        raise ValueError(f"a group with penalty {kind!r} needs penalty_lambda >= 0, got {lam!r}")
    if kind != "l2sp":
        return
    anchors = group.get("penalty_anchor")
    if anchors is None:
        _snapshot(group)
        return
    if len(anchors) != len(group["params"]):
        raise ValueError(f"penalty_anchor has {len(anchors)} arrays for {len(group['params'])} parameters")
    for i, (a, p) in enumerate(zip(anchors, group["params"])):
        if a.shape != p.data.shape:
            raise ValueError(f"penalty_anchor[{i}] has shape {a.shape}, its parameter {p.data.shape}")
    group["penalty_anchor"] = [to_device(a, device_of(p.data)).astype(p.data.dtype, copy=False)
                               for a, p in zip(anchors, group["params"])]


def snapshot_anchor(optimizer_or_groups) -> None:
    """θ₀ ← current weights, for every L2-SP group (call right after loading pretrained weights)."""
    for group in _groups(optimizer_or_groups):
        if group.get("penalty") == "l2sp":
            _snapshot(group)


def penalty_loss(optimizer_or_groups):
    """Σ over groups of the group's penalty (a scalar Tensor; zero when no group has one).

    Parameters with ``requires_grad=False`` are left out: they are constants.
    """
    total, first = None, None
    for group in _groups(optimizer_or_groups):
        kind, lam = group.get("penalty"), group.get("penalty_lambda", 0.0)
        for i, p in enumerate(group["params"]):
            first = p if first is None else first
            if kind is None or lam == 0 or not p.requires_grad:
                continue
            if kind == "l1":
                term = p.abs().sum()
            elif kind == "l2":
                term = (p * p).sum()
            else:
                d = p - group["penalty_anchor"][i]  # θ₀ enters as a constant
                term = (d * d).sum()
            term = term * lam
            total = term if total is None else total + term
    if total is None:  # a zero of the parameters' dtype, on their device
        return Tensor(first.xp.zeros((), first.data.dtype) if first is not None else np.zeros((), np.float32))
    return total


def _snapshot(group):
    group["penalty_anchor"] = [p.data.copy() for p in group["params"]]


def _groups(optimizer_or_groups):
    return getattr(optimizer_or_groups, "param_groups", optimizer_or_groups)
