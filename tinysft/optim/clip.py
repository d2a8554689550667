"""Gradient clipping, in place, with ``torch.nn.utils``'s semantics.

``clip_grad_norm_`` scales every gradient by ``min(1, c / (‖g‖ + 1e-6))`` where
``‖g‖`` is the norm of all gradients concatenated into one vector.

Float32 CUDA gradients go to ``tinysft.cuda.ops.clip`` (2-norm, clamping); the
rest use array ops. On NumPy the squared norm is summed in float64 from float32
dots over 64K-element chunks: relative error ~1e-9, where one float32 dot over
everything gives ~1e-4. Both passes (the dots, then the scaling) are memory-bound,
and one core streams about half of what two do, so on NumPy they are shared out
over the cores (``spans.map_spans``); the chunk dots come back in order and are
added in that order, so the norm has the same bits for every thread count.
"""
import math

import numpy as np

from ..backend import device_of, xp_for
from .spans import map_spans

_CHUNK = 1 << 16


class NonFiniteNormError(RuntimeError):
    """The total gradient norm is inf or nan, and ``error_if_nonfinite`` was set."""


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> float:
    """Scale gradients so that their total ``norm_type``-norm is at most ``max_norm``.

    Returns the total norm *before* clipping, as a float. As in PyTorch, a
    non-finite norm makes the gradients nan (scale = nan or 0·inf) unless
    ``error_if_nonfinite``, which raises ``NonFiniteNormError`` and leaves
    them unchanged.
    """
    grads = _grads(parameters)
    if not grads:
        return 0.0
    norm_type = float(norm_type)
    if _use_kernels(grads) and norm_type == 2.0:
        from ..cuda.ops import clip as kernels
        total, nonfinite = kernels.clip_grad_norm(grads, max_norm)  # scales in place unless non-finite
        scaled = not nonfinite
    else:
        total = _total_norm(grads, norm_type, xp_for(device_of(grads[0])))
        scaled = False
    if error_if_nonfinite and not math.isfinite(total):
        raise NonFiniteNormError(_nonfinite_message(norm_type))
    scale = max_norm / (total + 1e-6)
    if not scaled and not scale >= 1.0:  # also true for a nan scale
        with np.errstate(invalid="ignore"):  # inf · 0 = nan, as in PyTorch
            _scale(grads, scale)
    return total


def clip_grad_value_(parameters, clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]``, in place."""
    if clip_value < 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    grads = _grads(parameters)
    if grads and _use_kernels(grads):
        from ..cuda.ops import clip as kernels
        kernels.clip_grad_value(grads, clip_value)
        return
    for g in grads:
        g.clip(-clip_value, clip_value, out=g)


def _total_norm(grads, norm_type: float, xp) -> float:
    """‖concat(grads)‖ as a Python float, accumulated in float64."""
    if norm_type == math.inf:
        maxima = [float(xp.abs(g).max()) for g in grads if g.size]
        return math.nan if any(map(math.isnan, maxima)) else max(maxima, default=0.0)
    if norm_type == 2.0:
        return math.sqrt(sum(_squared_norms(grads, xp)))
    if norm_type <= 0:
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    total = sum(float((xp.abs(g.astype(xp.float64)) ** norm_type).sum()) for g in grads)
    return total ** (1.0 / norm_type)


def _squared_norms(grads, xp) -> list:
    """``[Σg² for g in grads]`` in float64: a float32 gradient as float32 dots over ``_CHUNK``-element
    chunks (fast, exact enough) added in chunk order, other dtypes as one float64 dot."""
    flats = [g.reshape(-1) if g.dtype == xp.float32 else g.reshape(-1).astype(xp.float64) for g in grads]
    chunk = [_CHUNK if f.dtype == xp.float32 else max(f.size, 1) for f in flats]

    def dots(k, first, stop):  # chunks [first, stop) of gradient k
        pieces = (flats[k][i * chunk[k]:(i + 1) * chunk[k]] for i in range(first, stop))
        return [float(xp.dot(c, c)) for c in pieces]

    sums = [0.0] * len(grads)
    for k, part in map_spans(dots, [-(-f.size // c) for f, c in zip(flats, chunk)], _CHUNK, xp is np):
        for d in part:
            sums[k] += d
    return sums


def _scale(grads, scale: float) -> None:
    """g ← scale·g for every gradient, in place."""
    flats = [g.reshape(-1) for g in grads if g.flags.c_contiguous]
    for g in grads:
        if not g.flags.c_contiguous:
            g *= scale
    if flats:
        xp = xp_for(device_of(flats[0]))
        map_spans(lambda k, lo, hi: xp.multiply(flats[k][lo:hi], scale, out=flats[k][lo:hi]),
                  [f.size for f in flats], parallel=xp is np)


def _grads(parameters):
    if hasattr(parameters, "data"):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _use_kernels(grads) -> bool:
    """True for CUDA gradients the kernels take (float32, contiguous); others use array ops."""
    devices = {device_of(g) for g in grads}
    if len(devices) > 1:
        raise ValueError("gradients are on more than one device; clip each device's parameters separately")
    return _on_cuda(grads) and all(g.dtype == np.float32 and g.flags.c_contiguous for g in grads)


def _on_cuda(grads) -> bool:
    return device_of(grads[0]) == "cuda"


def _nonfinite_message(norm_type: float) -> str:
    return (f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped; "
            "look for inf/nan in the loss or the gradients, or pass error_if_nonfinite=False to scale "
            "the gradients by the non-finite norm anyway")
