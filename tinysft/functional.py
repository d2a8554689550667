"""Neural-network functions on Tensors.

Most are compositions of Tensor primitives and need no backward of their own.
The fused composites get a hand-written backward because it is stabler or much
cheaper than the chain of primitives: linear, layer_norm, cross_entropy, the
scaled masked softmax of attention and the padding-aware embedding. Each is
written with the op-definition API of ``tinysft.tensor`` (``make_node``,
``accumulate_grad``, ``lift``); the primitives' derivatives (elementwise,
reductions, matmul, indexing, cat, where, softmax/log-softmax) live with
``Tensor`` and are re-exported here under their PyTorch names.

>>> from tinysft import tensor
>>> x = tensor([[1.0, 2.0, 3.0]], requires_grad=True)
>>> loss = cross_entropy(x, [2])
>>> round(loss.item(), 4)
0.4076
>>> loss.backward()
>>> x.grad.round(4)
array([[ 0.09  ,  0.2447, -0.3348]], dtype=float32)
"""
import numpy as np

from .rng import generator as default_generator
from .tensor import ShapeError, Tensor, cat, lift, make_node, where


class TargetError(IndexError):
    """A class label outside [0, num_classes) that is not the ignore_index."""


# ----- activations -----
def relu(x: Tensor) -> Tensor:
    return x.relu()


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU(x) = x·Φ(x); ``approximate='tanh'``: ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return x.gelu(approximate)


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


# ----- affine map -----
def linear(x: Tensor, weight: Tensor, bias: Tensor = None) -> Tensor:
    """y = x Wᵀ + b over the last axis: x (..., in), W (out, in), b (out,) → (..., out).

    The leading axes fold into one GEMM over N rows, and b is added in place on
    its fresh output. Backward (fused), with g the (N, out) upstream gradient:
      dx = g W;  dW = gᵀ x;  db = Σ_rows g.
    """
    weight = lift(weight, x)
    out_features, in_features = weight.shape if weight.ndim == 2 else (None, None)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(f"linear: input of shape {x.shape} does not fit a weight of shape {weight.shape}")
    if bias is not None:
        bias = lift(bias, x)
        if bias.shape != (out_features,):
            raise ShapeError(f"linear: bias of shape {bias.shape} for a weight of shape {weight.shape}")
    flat = x.data.reshape(-1, in_features)  # (N, in)
    value = flat @ weight.data.T  # (N, out); W.T is a view, BLAS reads it transposed
    if bias is not None:
        value += bias.data
    params = (x, weight) if bias is None else (x, weight, bias)
    out = make_node(value.reshape(*x.shape[:-1], out_features), params, "linear")
    if out.requires_grad:
        def backward_fn(grad):
            g = grad.reshape(-1, out_features)  # (N, out)
            if x.requires_grad:
                x.accumulate_grad((g @ weight.data).reshape(x.shape))
            if weight.requires_grad:
                weight.accumulate_grad(g.T @ flat, owned=True)
            if bias is not None and bias.requires_grad:
                bias.accumulate_grad(g.sum(axis=0), owned=True)
        out.backward_fn = backward_fn
    return out


# ----- joining and selecting (cat and where are primitives of tinysft.tensor) -----
concatenate = cat


def stack(tensors, axis=0) -> Tensor:
    """Stack equal-shaped tensors along a new ``axis``."""
    tensors = list(tensors)
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ShapeError(f"stack: all shapes must be equal, got {[t.shape for t in tensors]}")
    new_axis = axis % (tensors[0].ndim + 1)
    return cat([t.reshape(t.shape[:new_axis] + (1,) + t.shape[new_axis:]) for t in tensors], axis=new_axis)


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """``x`` with ``value`` where ``mask`` is True (no gradient flows to those entries)."""
    return where(mask, lift(value, x), x)


# ----- softmax family -----
def log_softmax(x: Tensor, axis=-1) -> Tensor:
    """x − log Σ e^x over ``axis`` (``Tensor.log_softmax``, fused backward there)."""
    return x.log_softmax(axis)


def softmax(x: Tensor, axis=-1) -> Tensor:
    """e^(x_i) / Σ_j e^(x_j) over ``axis`` (``Tensor.softmax``)."""
    return x.softmax(axis)


# ----- normalisation -----
def layer_norm(x: Tensor, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis: y = (x − μ)/√(σ² + ε) · w + b, σ² biased.

    Backward (fused), with x̂ the normalised input, D the width, r = 1/√(σ²+ε):
      dx̂ = g·w;  dx = r/D · (D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂));  dw = Σ g·x̂;  db = Σ g.
    """
    xp = x.xp
    width = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (width,):
            raise ShapeError(f"layer_norm: {name} of shape {p.shape} for input of shape {x.shape}")
    mean = x.data.mean(axis=-1, keepdims=True)
    normed = x.data - mean  # (..., D): centred here, normalised in place below
    rstd = 1.0 / xp.sqrt((normed * normed).mean(axis=-1, keepdims=True) + eps)
    normed *= rstd
    value = normed
    if weight is not None:
        value = value * weight.data
    if bias is not None:
        value = value + bias.data if value is normed else xp.add(value, bias.data, out=value)
    params = tuple(p for p in (weight, bias) if p is not None)
    out = make_node(value, (x,) + params, "layer_norm")
    if out.requires_grad:
        def backward_fn(g):
            dnormed = g * weight.data if weight is not None else g
            if x.requires_grad:
                # the bracket is built in place: D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂), then scaled by r/D
                dx = dnormed * width
                dx -= dnormed.sum(axis=-1, keepdims=True)
                product = dnormed * normed
                dx -= xp.multiply(normed, product.sum(axis=-1, keepdims=True), out=product)
                dx *= rstd / width
                x.accumulate_grad(dx)
            leading = tuple(range(g.ndim - 1))
            if weight is not None and weight.requires_grad:
                weight.accumulate_grad((g * normed).sum(axis=leading), owned=True)
            if bias is not None and bias.requires_grad:
                bias.accumulate_grad(g.sum(axis=leading), owned=True)
        out.backward_fn = backward_fn
    return out


# ----- lookups and noise -----
def embedding(weight: Tensor, ids) -> Tensor:
    """Rows of ``weight`` [V, D] picked by integer ``ids`` [...] → [..., D]; backward scatter-adds."""
    ids = ids.data if isinstance(ids, Tensor) else weight.xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        bad = int(ids.max()) if int(ids.max()) >= weight.shape[0] else int(ids.min())
        raise TargetError(f"embedding: id {bad} out of range for a table of {weight.shape[0]} rows")
    return weight[ids]


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout: zero each entry with probability p, scale survivors by 1/(1−p).

    E[output] = x, so evaluation (``training=False``) is the identity.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    rng = generator or default_generator(x.device)
    noise = rng.random(x.shape, dtype=x.dtype if x.dtype == np.float32 else np.float64)  # U[0, 1)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    mask = x.xp.multiply(noise >= p, scale, out=noise)  # 1/(1−p) where kept, 0 where dropped
    return x * Tensor(mask.astype(x.dtype, copy=False))


# ----- losses -----
def cross_entropy(logits: Tensor, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy over logits [N, C] (or [..., C]) and class ids [N] (or [...]).

    With p = softmax(x), ε = label_smoothing and y = (1−ε)·onehot + ε/C:
      loss_i = −Σ_c y_ic log p_ic = (1−ε)(lse_i − x_i,t) + ε(lse_i − mean_c x_ic),
    rows whose target is ``ignore_index`` give 0 and are left out of the mean
    (PyTorch semantics). Backward (fused): dlogits_i = (p_i − y_i) · g_i.
    On CUDA the forward and backward come from one kernel launch.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    xp = logits.xp
    target = target.data if isinstance(target, Tensor) else xp.asarray(target)
    if logits.ndim < 1 or target.shape != logits.shape[:-1]:
        raise ShapeError(f"cross_entropy: logits of shape {logits.shape} need targets of shape "
                         f"{logits.shape[:-1]}, got {target.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {target.dtype}")
    classes = logits.shape[-1]
    rows = logits.data.reshape(-1, classes)  # (N, C)
    target = target.reshape(-1)  # (N,)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        where_bad = int(xp.argmax(bad))
        raise TargetError(f"cross_entropy: target {int(target[where_bad])} at position {where_bad} is out of "
                          f"range for {classes} classes (and is not ignore_index={ignore_index})")
    count = int(valid.sum())
    # mean: an all-ignored batch gives a NaN loss but a zero gradient, as in PyTorch
    row_scale = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0

    if logits.device == "cuda":
        from .cuda.kernels import softmax_cross_entropy
        loss_rows, _, dlogits = softmax_cross_entropy(rows, target, ignore_index=ignore_index,
                                                      label_smoothing=label_smoothing, row_scale=row_scale)
    else:
        loss_rows, dlogits = _cross_entropy_rows(rows, target, valid, label_smoothing, row_scale)
    # dlogits: (N, C), row_scale times the gradient of loss_rows.sum() with respect to the rows

    if reduction == "mean":
        value = loss_rows.sum() * row_scale if count else np.nan
    elif reduction == "sum":
        value = loss_rows.sum()
    else:
        value = loss_rows.reshape(logits.shape[:-1])
    out = make_node(xp.asarray(value, dtype=rows.dtype), (logits,), "cross_entropy")
    if out.requires_grad:
        def backward_fn(grad):
            scale = grad.reshape(-1, 1) if reduction == "none" else grad
            # a loss's upstream gradient is usually 1: then dlogits is the gradient as it stands (it is
            # never edited in place, so later backward calls can reuse it)
            scaled = dlogits if bool((scale == 1).all()) else dlogits * scale
            logits.accumulate_grad(scaled.reshape(logits.shape))
        out.backward_fn = backward_fn
    return out


def _cross_entropy_rows(rows, target, valid, label_smoothing, row_scale):
    """NumPy path: per-row losses (N,) and row_scale · d(Σ loss)/d rows (N, C).

    One (N, C) buffer and four passes over it: shifted = x − max; e^shifted in place; its row
    sums (→ log-sum-exp); then e · row_scale/Σe in place, which also zeroes ignored rows. The
    target (and smoothing) terms are subtracted after that; nothing else touches all N·C values.
    """
    count, classes = rows.shape
    index = np.arange(count)
    safe_target = np.where(valid, target, 0)
    peak = rows.max(axis=1, keepdims=True)  # (N, 1)
    picked = rows[index, safe_target] - peak[:, 0]  # (N,) the shifted target logits
    mean_logit = rows.mean(axis=1) - peak[:, 0] if label_smoothing else 0.0
    grad = np.subtract(rows, peak)  # (N, C) shifted logits; becomes e^x, then the gradient, in place
    np.exp(grad, out=grad)
    sum_exp = grad.sum(axis=1)
    lse = np.log(sum_exp)  # (N,) log-sum-exp of the shifted row
    loss = (1.0 - label_smoothing) * (lse - picked) + label_smoothing * (lse - mean_logit)
    scale = np.where(valid, row_scale, 0.0)  # (N,) zero on ignored rows
    grad *= (scale / sum_exp).astype(grad.dtype)[:, None]  # softmax · scale
    if label_smoothing:
        grad -= (scale * (label_smoothing / classes)).astype(grad.dtype)[:, None]
    grad[index, safe_target] -= (scale * (1.0 - label_smoothing)).astype(grad.dtype)
    return np.where(valid, loss, 0.0).astype(rows.dtype), grad


def mse_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:
    """Mean squared error (1/n) Σ (input − target)²; d/dinput = 2(input − target)/n."""
    target = lift(target, input)
    if input.shape != target.shape:
        raise ShapeError(f"mse_loss: input of shape {input.shape} and target of shape {target.shape} differ")
    squared = (input - target) ** 2
    if reduction == "mean":
        return squared.mean()
    if reduction == "sum":
        return squared.sum()
    if reduction == "none":
        return squared
    raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


__all__ = ["relu", "gelu", "sigmoid", "tanh", "cat", "concatenate", "stack", "where", "masked_fill",
           "log_softmax", "softmax", "layer_norm", "embedding", "dropout", "cross_entropy", "mse_loss",
           "TargetError"]
