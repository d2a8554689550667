"""Neural-network functions on Tensors.

Most are compositions of Tensor primitives and need no backward of their own.
The fused composites get a hand-written backward because it is stabler or much
cheaper than the chain of primitives: linear, layer_norm, cross_entropy, the
scaled masked softmax and scaled dot-product attention, and the padding-aware
embedding (linear, layer_norm and the attention run their large NumPy passes
over row blocks on the cores: ``threads.split_rows``). Each is written with the
op-definition API of ``tinysft.tensor`` (``make_node``,
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
import math
import sys
import threading

import numpy as np

from .backend import scatter_add
from .rng import generator as default_generator, uniform_at_least
from .tensor import ShapeError, Tensor, cat, is_grad_enabled, lift, make_node, where
from .threads import map_rows, split_rows


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


def _column_sums(xp, rows, factor=None):
    """Σ over the N rows of ``rows`` (N, D) (times ``factor`` (N, D) first, when given) → (D,).

    Computed over blocks of columns on the cores (``split_rows``), each column summed over all
    N rows as one call would, so the result is the same for any thread count."""
    total = xp.empty(rows.shape[1], dtype=rows.dtype)

    def block(start, stop):
        part = rows[:, start:stop] if factor is None else rows[:, start:stop] * factor[:, start:stop]
        xp.sum(part, axis=0, out=total[start:stop])

    split_rows(xp, block, rows.shape[1], rows.shape[0])
    return total


# ----- affine map -----
def linear(x: Tensor, weight: Tensor, bias: Tensor = None) -> Tensor:
    """y = x Wᵀ + b over the last axis: x (..., in), W (out, in), b (out,) → (..., out).

    The leading axes fold into one GEMM over N rows, and b is added in place on
    its fresh output, over blocks of rows on the cores. Backward (fused), with g the
    (N, out) upstream gradient:
      dx = g W;  dW = gᵀ x;  db = Σ_rows g   (db over blocks of columns: ``_column_sums``).
    """
    weight = lift(weight, x)
    out_features, in_features = weight.shape if weight.ndim == 2 else (None, None)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(f"linear: input of shape {x.shape} does not fit a weight of shape {weight.shape}")
    if bias is not None:
        bias = lift(bias, x)
        if bias.shape != (out_features,):
            raise ShapeError(f"linear: bias of shape {bias.shape} for a weight of shape {weight.shape}")
    xp = x.xp
    flat = x.data.reshape(-1, in_features)  # (N, in)
    value = flat @ weight.data.T  # (N, out); W.T is a view, BLAS reads it transposed
    if bias is not None:
        def add_bias(start, stop):  # rows [start, stop)
            xp.add(value[start:stop], bias.data, out=value[start:stop])
        split_rows(xp, add_bias, len(value), out_features)
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
                bias.accumulate_grad(_column_sums(xp, g), owned=True)
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
    Each row is its own problem, so the forward and dx run over blocks of rows on the cores
    (``split_rows``: these are single-threaded ufunc passes); dw and db, sums over the rows, over
    blocks of columns (``_column_sums``). x̂ (N, D) and r (N, 1) are kept for the backward.
    """
    xp = x.xp
    width = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (width,):
            raise ShapeError(f"layer_norm: {name} of shape {p.shape} for input of shape {x.shape}")
    params = tuple(p for p in (weight, bias) if p is not None)
    rows = x.data.reshape(-1, width)  # (N, D)
    count = rows.shape[0]
    normed = xp.empty_like(rows)  # x̂ (N, D)
    rstd = xp.empty((count, 1), dtype=rows.dtype)  # r (N, 1)
    # y (N, D): over x̂ in place when no backward will need x̂ (one (N, D) array fewer)
    keep = is_grad_enabled() and any(t.requires_grad for t in (x,) + params)
    value = xp.empty_like(rows) if keep and params else normed

    def forward_block(start, stop):  # rows [start, stop)
        block = slice(start, stop)
        centred = xp.subtract(rows[block], rows[block].mean(axis=-1, keepdims=True), out=normed[block])
        xp.divide(1.0, xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps), out=rstd[block])
        centred *= rstd[block]
        if weight is not None:
            xp.multiply(centred, weight.data, out=value[block])
        if bias is not None:
            xp.add(value[block] if weight is not None else centred, bias.data, out=value[block])

    split_rows(xp, forward_block, count, width)
    out = make_node(value.reshape(x.shape), (x,) + params, "layer_norm")
    if out.requires_grad:
        def backward_fn(g):
            grad = g.reshape(-1, width)  # (N, D)
            if x.requires_grad:
                dx = xp.empty_like(rows)  # (N, D)

                def dx_block(start, stop):
                    # the bracket built in place: D·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂), then scaled by r/D
                    block = slice(start, stop)
                    dnormed = grad[block] * weight.data if weight is not None else grad[block]
                    bracket = xp.multiply(dnormed, width, out=dx[block])
                    bracket -= dnormed.sum(axis=-1, keepdims=True)
                    product = dnormed * normed[block]
                    bracket -= xp.multiply(normed[block], product.sum(axis=-1, keepdims=True), out=product)
                    bracket *= rstd[block] / width

                split_rows(xp, dx_block, count, width)
                x.accumulate_grad(dx.reshape(x.shape), owned=True)
            if weight is not None and weight.requires_grad:
                weight.accumulate_grad(_column_sums(xp, grad, normed), owned=True)
            if bias is not None and bias.requires_grad:
                bias.accumulate_grad(_column_sums(xp, grad), owned=True)
        out.backward_fn = backward_fn
    return out


# ----- lookups and noise -----
def embedding(weight: Tensor, ids, padding_idx: int = None) -> Tensor:
    """Rows of ``weight`` [V, D] picked by integer ``ids`` [...] → [..., D]; backward scatter-adds.

    ``padding_idx``: that row gets no gradient (PyTorch's padding_idx); its value is
    still used in the forward. Backward: dW[v] = Σ_{positions p with ids_p = v} g_p,
    then dW[padding_idx] = 0.
    """
    ids = ids.data if isinstance(ids, Tensor) else weight.xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        bad = int(ids.max()) if int(ids.max()) >= weight.shape[0] else int(ids.min())
        raise TargetError(f"embedding: id {bad} out of range for a table of {weight.shape[0]} rows")
    if padding_idx is None:
        return weight[ids]
    out = make_node(weight.data[ids], (weight,), "embedding")  # (..., D)
    if out.requires_grad:
        def backward_fn(grad):
            full = weight.xp.zeros(weight.shape, dtype=weight.dtype)  # (V, D)
            scatter_add(full, ids, grad)
            full[padding_idx] = 0
            weight.accumulate_grad(full, owned=True)
        out.backward_fn = backward_fn
    return out


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout: zero each entry with probability p, scale survivors by 1/(1−p).

    E[output] = x, so evaluation (``training=False``) is the identity.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    mask = dropout_keep(x.shape, p, x.dtype, x.device, generator).astype(x.dtype)
    mask *= dropout_scale(p)  # 1/(1−p) where kept, 0 where dropped
    return x * Tensor(mask)


def dropout_keep(shape, p: float, dtype, device: str = "cpu", generator=None):
    """Dropout's keep mask of ``shape``: True where U[0, 1) ≥ p (probability 1 − p). The uniforms
    are float32 for float32 tensors, else float64, so a seed gives the same masks to ``dropout``
    and to the ops that keep the mask as booleans (LoRA's adapters). On the CPU the uniforms are
    drawn over the cores, the same numbers at any thread count (``rng.uniform_at_least``)."""
    rng = generator or default_generator(device)
    return uniform_at_least(rng, shape, np.float32 if dtype == np.float32 else np.float64, p)


def dropout_scale(p: float) -> float:
    """What inverted dropout multiplies a kept entry by: 1/(1 − p) (0 when p = 1: nothing is kept)."""
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


# ----- attention -----
def attention_bias(attention_mask, dtype=np.float32, like: Tensor = None) -> Tensor:
    """Additive bias (B, 1, 1, T) from a [B, T] keep-mask: 0 where 1, finfo(dtype).min where 0.

    >>> attention_bias([[1, 0]]).shape
    (1, 1, 1, 2)
    """
    mask = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
    xp = like.xp if like is not None else np
    mask = xp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T] (1 = keep, 0 = pad), got shape {mask.shape}")
    bias = (1 - mask.astype(dtype)) * np.finfo(dtype).min  # (B, T)
    return Tensor(bias[:, None, None, :])  # (B, 1, 1, T)


def _softmax_forward(z, scale: float, bias, xp):
    """z ← softmax(z · scale + bias) over the last axis, in place (stable: the row max is subtracted)."""
    z *= z.dtype.type(scale)
    if bias is not None:
        z += bias
    z -= z.max(axis=-1, keepdims=True)
    xp.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _softmax_backward(dp, p, scale: float):
    """dp ← scale · p ⊙ (dp − Σ_j dp_j p_j), in place: the gradient of the scores z from that of
    p = softmax(z · scale + bias)."""
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p
    dp *= scale
    return dp


def scaled_masked_softmax(scores: Tensor, scale: float, bias: Tensor = None) -> Tensor:
    """softmax(scores · scale + bias) over the last axis, as one node (fused, stable).

    Only the probabilities p are kept for the backward:
    d scores = scale · p ⊙ (g − Σ_j g_j p_j). ``bias`` is a constant (no gradient).
    """
    bias = bias.data if isinstance(bias, Tensor) else bias
    z = _softmax_forward(scores.data.copy(), scale, bias, scores.xp)  # (B, H, T, T)
    out = make_node(z, (scores,), "masked_softmax")
    if out.requires_grad:
        out.backward_fn = lambda g: scores.accumulate_grad(_softmax_backward(g.copy(), z, scale), owned=True)
    return out


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor = None,
                                 dropout_p: float = 0.0, training: bool = False, generator=None) -> Tensor:
    """softmax(q kᵀ/√d + bias) v on (B, H, T, d) heads, dropout on the probabilities, as one node.

    q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv); ``bias`` (a constant, no gradient)
    broadcasts to (B, H, T, S). With c = 1/√d and M the dropout multiplier (1/(1−p) where
    kept, 0 where dropped; no M in eval mode or with p = 0):
      P = softmax(q kᵀ · c + bias);   P̃ = P ⊙ M;   y = P̃ v   → (B, H, T, dv)
    Backward (fused), g = dy:
      dv = P̃ᵀ g;   dP = (g vᵀ) ⊙ M;   ds = c · P ⊙ (dP − Σ_j dP_j P_j);   dq = ds k;   dk = dsᵀ q.
    Only P and M are kept. The values are those of the composition q @ kᵀ →
    ``scaled_masked_softmax`` → ``dropout`` → @ v (the same draw from ``generator``, the same
    operations in the same order), without its four graph nodes. Batch entries are independent,
    so both passes run over blocks of them on the cores (``split_rows``): the per-head GEMMs here
    are too small for BLAS to thread, and the softmax passes are single-threaded ufuncs.
    y, dq, dk and dv are written in (B, T, H, ·) memory order and returned as (B, H, T, ·)
    views, so the head merge after this op and the split before it (permute + reshape) cost no copy.
    """
    k, v = lift(k, q), lift(v, q)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] \
            or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"scaled_dot_product_attention: need q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv); "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    xp = q.xp
    batch, heads, length, head_dim = q.shape
    keys, value_dim = k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    scores_shape = (batch, heads, length, keys)
    if bias is not None:
        bias = xp.asarray(bias.data if isinstance(bias, Tensor) else bias)
        try:
            fits = bias.ndim <= 4 and np.broadcast_shapes(bias.shape, scores_shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(f"scaled_dot_product_attention: bias of shape {bias.shape} does not broadcast "
                             f"to the scores' (B, H, T, S) = {scores_shape}")
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # (B or 1, H or 1, T or 1, S or 1)
    # M as the dropout of ones: the draw dropout(P) would make, and one dropout for every caller;
    # None where dropout is the identity (eval mode, p = 0)
    ones = Tensor(xp.broadcast_to(xp.ones((), dtype=q.dtype), scores_shape))
    dropped = dropout(ones, dropout_p, training, generator)
    mask = None if dropped is ones else dropped.data  # M (B, H, T, S)

    def heads_view(positions, width):  # a new (B, positions, H, width) buffer seen as (B, H, positions, width)
        return xp.empty((batch, positions, heads, width), dtype=q.dtype).swapaxes(1, 2)

    probs = xp.empty(scores_shape, dtype=q.dtype)  # P
    value = heads_view(length, value_dim)  # y (B, H, T, dv)

    def forward_block(start, stop):  # batch entries [start, stop)
        rows = slice(start, stop)
        p = xp.matmul(q.data[rows], k.data[rows].swapaxes(-1, -2), out=probs[rows])  # q kᵀ (n, H, T, S)
        _softmax_forward(p, scale, None if bias is None else bias[rows] if len(bias) > 1 else bias, xp)
        xp.matmul(p if mask is None else p * mask[rows], v.data[rows], out=value[rows])

    split_rows(xp, forward_block, batch, heads * length * keys)
    out = make_node(value, (q, k, v), "scaled_dot_product_attention")
    if out.requires_grad:
        def backward_fn(g):
            dq = heads_view(length, head_dim) if q.requires_grad else None
            dk = heads_view(keys, head_dim) if k.requires_grad else None
            dv = heads_view(keys, value_dim) if v.requires_grad else None

            def backward_block(start, stop):
                rows = slice(start, stop)
                p, grad = probs[rows], g[rows]
                if dv is not None:
                    xp.matmul((p if mask is None else p * mask[rows]).swapaxes(-1, -2), grad, out=dv[rows])
                if dq is None and dk is None:
                    return
                ds = grad @ v.data[rows].swapaxes(-1, -2)  # dP̃ (n, H, T, S), then ds in place
                if mask is not None:
                    ds *= mask[rows]
                _softmax_backward(ds, p, scale)
                if dq is not None:
                    xp.matmul(ds, k.data[rows], out=dq[rows])
                if dk is not None:
                    # as (qᵀ ds)ᵀ, the composition's product (dsᵀ q rounds differently, by ~1e-7)
                    dk[rows] = (q.data[rows].swapaxes(-1, -2) @ ds).swapaxes(-1, -2)

            split_rows(xp, backward_block, batch, heads * length * keys)
            for tensor, grad in ((q, dq), (k, dk), (v, dv)):
                if grad is not None:
                    tensor.accumulate_grad(grad, owned=True)
        out.backward_fn = backward_fn
    return out


# ----- pooling -----
def cls_pool(hidden: Tensor, attention_mask=None) -> Tensor:
    """The first token's state: (B, T, D) -> (B, D). ``attention_mask`` is ignored."""
    return hidden[:, 0]


def mean_pool(hidden: Tensor, attention_mask=None) -> Tensor:
    """Mean over unpadded tokens (sentence-transformers): Σ_t m_t h_t / max(Σ_t m_t, 1e-9).

    hidden: (B, T, D), attention_mask: (B, T) with 1 = keep -> (B, D).
    """
    if attention_mask is None:
        return hidden.mean(axis=1)
    mask = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
    mask = hidden.xp.asarray(mask).astype(hidden.dtype)  # (B, T)
    counts = hidden.xp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)  # (B, 1)
    weights = Tensor(mask[:, :, None] / counts[:, :, None])  # (B, T, 1)
    return (hidden * weights).sum(axis=1)  # (B, D)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖₂, eps) over the last axis (torch.nn.functional.normalize).

    >>> from tinysft import tensor
    >>> l2_normalize(tensor([[3.0, 4.0]]))
    tensor(array([[0.6, 0.8]], dtype=float32))
    """
    norm = (x * x).sum(axis=-1, keepdims=True).sqrt()  # (..., 1)
    return x / where(norm.data > eps, norm, eps)


# ----- losses -----
def cross_entropy(logits: Tensor, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", z_loss: float = 0.0) -> Tensor:
    """Softmax cross-entropy over logits [N, C] (or [..., C]) and class ids [N] (or [...]).

    With p = softmax(x), ε = label_smoothing, y = (1−ε)·onehot + ε/C, lse_i = log Σ_c e^x_ic
    and z = z_loss (PaLM's auxiliary term that keeps lse near 0):
      loss_i = −Σ_c y_ic log p_ic + z·lse_i² = (1−ε)(lse_i − x_i,t) + ε(lse_i − mean_c x_ic) + z·lse_i²,
    rows whose target is ``ignore_index`` give 0 and are left out of the mean
    (PyTorch semantics). Backward (fused): dlogits_i = (p_i·(1 + 2z·lse_i) − y_i) · g_i.
    On CUDA the forward and backward come from one kernel launch.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"cross_entropy: z_loss must be ≥ 0, got {z_loss}")
    xp = logits.xp
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ShapeError(f"cross_entropy: logits must have a class axis of at least one class, got shape {logits.shape}")
    classes = logits.shape[-1]
    rows = logits.data.reshape(-1, classes)  # (N, C)
    target, valid = _class_targets(target, logits.shape[:-1], classes, ignore_index, xp,
                                   f"cross_entropy: logits of shape {logits.shape}")
    count = int(valid.sum())
    # mean: an all-ignored batch gives a NaN loss but a zero gradient, as in PyTorch
    row_scale = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0

    def loss_and_gradient(with_grad):
        # → losses (N,) and dlogits (N, C): row_scale times the gradient of their sum (None without grad)
        if logits.device == "cuda":
            from .cuda import softmax_cross_entropy
            loss_rows, _, grad = softmax_cross_entropy(rows, target, ignore_index=ignore_index,
                                                       label_smoothing=label_smoothing, z_loss=z_loss,
                                                       row_scale=row_scale)
            return loss_rows, grad
        return _cross_entropy_rows(rows, target, valid, label_smoothing, z_loss, row_scale, with_grad)

    loss_rows, dlogits = loss_and_gradient(is_grad_enabled() and logits.requires_grad)

    if reduction == "mean":
        value = loss_rows.sum() * row_scale if count else np.nan
    elif reduction == "sum":
        value = loss_rows.sum()
    else:
        value = loss_rows.reshape(logits.shape[:-1])
    out = make_node(xp.asarray(value, dtype=rows.dtype), (logits,), "cross_entropy")
    if out.requires_grad:
        handed = [dlogits]

        def backward_fn(grad):
            # the forward's dlogits is given away to the logits, scaled in place unless the upstream
            # gradient is 1 (a loss's usual case): no (N, C) copy. A second backward computes it again.
            scaled = handed[0] if handed[0] is not None else loss_and_gradient(True)[1]
            handed[0] = None
            scale = grad.reshape(-1, 1) if reduction == "none" else grad
            if not bool((scale == 1).all()):
                scaled *= scale.astype(scaled.dtype)
            logits.accumulate_grad(scaled.reshape(logits.shape), owned=True)
        out.backward_fn = backward_fn
    return out


def _class_targets(target, shape, classes, ignore_index, xp, what):
    """Class ids of ``shape`` as a flat (N,) array and its mask of non-ignored rows (N,), checked:
    integers, each in [0, classes) or ``ignore_index``. ``what`` names the caller and its input
    in the errors ("cross_entropy: logits of shape (4, 3)")."""
    target = target.data if isinstance(target, Tensor) else xp.asarray(target)
    op = what.split(":")[0]
    if target.shape != tuple(shape):
        raise ShapeError(f"{what} need targets of shape {tuple(shape)}, got {target.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{op}: targets must be integer class ids, got dtype {target.dtype}")
    target = target.reshape(-1)  # (N,)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        where_bad = int(xp.argmax(bad))
        raise TargetError(f"{op}: target {int(target[where_bad])} at position {where_bad} is out of "
                          f"range for {classes} classes (and is not ignore_index={ignore_index})")
    return target, valid


CE_BLOCK_ELEMENTS = 1 << 16
"""Logits per row block of the NumPy cross-entropy (256 KiB of float32: the block and its output fit in L2)."""
CE_SUM_FLOOR = 2.0 ** -60
"""A row whose Σ e^(x − block max) is below this (its largest logit lies > 41 below the block's) is redone with its own max."""


CE_SPARE_BYTES = 256 * 2 ** 20
"""The largest gradient buffer ``_spare_gradient`` keeps between calls."""
_spare = {}  # dtype → the last gradient buffer (flat), for the next call once nothing else holds it
_spare_lock = threading.Lock()


def _spare_gradient(shape, dtype):
    """An uninitialised array of ``shape`` for a cross-entropy gradient: the memory of an earlier
    one once nothing but this cache refers to it any more, else a fresh array (kept for next
    time when it is at most ``CE_SPARE_BYTES``).

    Why: a fresh (N, C) array costs its page faults on first write (a 62 MB gradient at
    512×30522: 188 against 154 ms for the whole row routine, measured under load), and the
    gradient handed to the logits dies before the next step (a leaf's when ``.grad`` is
    cleared, an intermediate's after its backward).
    Ownership is read from CPython's reference count: every holder — a tensor's ``.grad``,
    a view (its ``.base`` is the buffer), a backward closure — adds one, so a count of 2 (the
    cache's entry and the argument of ``getrefcount``) means no one else can see the memory.
    """
    size = math.prod(shape)
    with _spare_lock:
        if dtype in _spare and _spare[dtype].size >= size and sys.getrefcount(_spare[dtype]) == 2:
            return _spare[dtype][:size].reshape(shape)
        buffer = np.empty(size, dtype)
        if buffer.nbytes <= CE_SPARE_BYTES:
            _spare[dtype] = buffer
        return buffer.reshape(shape)


def _cross_entropy_rows(rows, target, valid, label_smoothing, z_loss, row_scale, with_grad=True, out=None):
    """NumPy path: per-row losses (N,) and row_scale · d(Σ loss)/d rows (N, C), or None when not
    ``with_grad``. ``out``: an (N, C) array to write the gradient into (it may be ``rows``
    itself: a block of rows is written only after its last read); by default one from
    ``_spare_gradient``.

    The rows go in blocks of about ``CE_BLOCK_ELEMENTS`` logits, a grid fixed by the shape, so
    the bits do not depend on the thread count; ``map_rows`` spreads the blocks over the cores.
    Each block is read from memory once and finished while it sits in the cache:
      m = the block's largest logit (0 when e^x is safe as it is);  e = e^(x − m) (a block-sized
      scratch, reused);  s_i = Σ_c e_ic;
      lse_i = m + log s_i;  gradient rows e_i · row_scale·(1 + 2z·lse_i)/s_i (− row_scale·ε/C);
    the target terms are subtracted at the end, at the N target positions only. Measured on
    512×30522 float32: the old separate passes over fresh (N, C) temporaries took about twice as
    long as e^x itself, which is now most of the time.
    Shifting by the block's max, not each row's, makes that one vectorised reduction instead of a
    reduction per row (per row, NumPy spends ~60 ns of overhead: at 32 classes that cost more than
    the exponentials). The shift changes no value but the rounding; a row far below the block's
    max, whose sum s_i < ``CE_SUM_FLOOR`` (or inf/NaN), is redone with its own max.
    """
    rows = np.ascontiguousarray(rows)
    count, classes = rows.shape
    grad = (_spare_gradient(rows.shape, rows.dtype) if out is None else out) if with_grad else None
    safe_target = np.where(valid, target, 0)
    flat_target = np.arange(count) * classes + safe_target  # (N,) the targets' positions in rows.ravel()
    picked = rows.reshape(-1).take(flat_target).astype(np.float64)  # (N,) target logits
    scale = np.where(valid, row_scale, 0.0)  # (N,) zero on ignored rows
    lse = np.empty(count)  # (N,) float64 log-sum-exp of each row
    mean_logit = np.empty(count) if label_smoothing else 0.0
    step = max(1, CE_BLOCK_ELEMENTS // classes)  # rows per block

    def run_blocks(first, last):  # the grid's blocks [first, last)
        spare = np.empty((min(step, count), classes), rows.dtype)  # e of one block, reused: stays in cache
        for start in range(first * step, min(last * step, count), step):
            stop = min(start + step, count)
            x, e = rows[start:stop], spare[:stop - start]  # (b, C)
            peak = x.max()
            if -30.0 <= peak <= 64.0:  # e^x neither overflows nor leaves the top rows below the floor:
                shift = np.zeros((stop - start, 1), x.dtype)  # no shift, one pass fewer
                np.exp(x, out=e)
            else:
                shift = np.full((stop - start, 1), peak)  # (b, 1)
                np.exp(np.subtract(x, shift, out=e), out=e)
            sums = np.einsum("ij->i", e)  # (b,) faster than e.sum(axis=1), and as exact here
            redo = np.flatnonzero(~(sums >= CE_SUM_FLOOR))
            if redo.size:  # rows far below the block's max (or with an inf/NaN): their own max
                shift[redo] = x[redo].max(axis=1, keepdims=True)
                e[redo] = np.exp(x[redo] - shift[redo])
                sums[redo] = np.einsum("ij->i", e[redo])
            lse[start:stop] = np.log(sums) + shift[:, 0].astype(np.float64)
            if label_smoothing:
                mean_logit[start:stop] = np.einsum("ij->i", x, dtype=np.float64) / classes
            if with_grad:
                factor = scale[start:stop] / sums  # softmax · row scale
                if z_loss:
                    factor *= 1.0 + 2.0 * z_loss * lse[start:stop]
                block = np.multiply(e, factor.astype(e.dtype)[:, None], out=grad[start:stop])  # x is read no more
                if label_smoothing:
                    block -= (scale[start:stop] * (label_smoothing / classes)).astype(e.dtype)[:, None]

    map_rows(run_blocks, -(-count // step), row_cost=step * classes)
    loss = lse - picked
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
    if z_loss:
        loss += z_loss * lse * lse
    if with_grad:
        np.subtract.at(grad.reshape(-1), flat_target, (scale * (1.0 - label_smoothing)).astype(grad.dtype))
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


__all__ = ["relu", "gelu", "sigmoid", "tanh", "linear", "cat", "concatenate", "stack", "where", "masked_fill",
           "log_softmax", "softmax", "layer_norm", "embedding", "dropout", "attention_bias",
           "scaled_masked_softmax", "scaled_dot_product_attention", "cls_pool", "mean_pool", "l2_normalize",
           "cross_entropy", "mse_loss", "TargetError"]


# ----- decoder ops -----
# The blocks of a Llama-family decoder, each one graph node with its backward fused beside it.
# Work buffers are fresh arrays edited in place; float32 inputs stay float32, float64 stay float64.

def _constant(x) -> Tensor:
    """An array argument (NumPy, CuPy, a list, or a Tensor) as a Tensor on the array's own device."""
    return x if isinstance(x, Tensor) else Tensor(x if hasattr(x, "shape") else np.asarray(x))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last axis: x (..., D), w (D,) → (..., D).

      r = 1/√(mean(x²) + ε);  x̂ = x·r;  y = x̂·w.
    Backward (fused), with g the upstream gradient and dx̂ = g·w:
      dx = r · (dx̂ − x̂ · mean(dx̂·x̂));  dw = Σ_rows g·x̂.
    Only r (one number per row) is kept; x̂ is recomputed from x in the backward.

    >>> from tinysft import tensor
    >>> rms_norm(tensor([[3.0, 4.0]]), tensor([1.0, 2.0]), eps=0.0).numpy().round(4)
    array([[0.8485, 2.2627]], dtype=float32)
    """
    weight = lift(weight, x)
    width = x.shape[-1] if x.ndim else None
    if weight.shape != (width,):
        raise ShapeError(f"rms_norm: weight of shape {weight.shape} for input of shape {x.shape}")
    xp = x.xp
    rstd = (x.data * x.data).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd += eps
    xp.sqrt(rstd, out=rstd)
    xp.divide(1, rstd, out=rstd)
    value = x.data * rstd  # (..., D) x̂, scaled by w in place
    value *= weight.data
    out = make_node(value, (x, weight), "rms_norm")
    if out.requires_grad:
        def backward_fn(g):
            normed = x.data * rstd  # x̂ (..., D)
            if weight.requires_grad:
                weight.accumulate_grad((g * normed).reshape(-1, width).sum(axis=0), owned=True)
            if x.requires_grad:
                dx = g * weight.data  # dx̂, becomes dx in place
                normed *= (dx * normed).mean(axis=-1, keepdims=True)
                dx -= normed
                dx *= rstd
                x.accumulate_grad(dx, owned=True)
        out.backward_fn = backward_fn
    return out


def rope_cache(positions, dim: int, base: float):
    """The cos and sin tables of rotary embeddings for integer ``positions`` (B, T) or (T,).

    θ_i = base^(−2i/dim) for i < dim/2, angle = position · θ_i (computed in float64);
    returns (cos, sin), float32 arrays of shape (B or 1, 1, T, dim/2), on the positions' device.
    """
    positions = _constant(positions)
    xp = positions.xp
    positions = positions.data
    if positions.dtype.kind not in "iu" or positions.ndim not in (1, 2):
        raise ShapeError(f"rope_cache: positions must be integers of shape (B, T) or (T,), "
                         f"got {positions.dtype} of shape {positions.shape}")
    if dim <= 0 or dim % 2:
        raise ShapeError(f"rope_cache: dim must be a positive even number, got {dim}")
    inverse_frequency = float(base) ** (-xp.arange(0, dim, 2, dtype=xp.float64) / dim)  # (dim/2,)
    angles = positions.reshape(-1, 1, positions.shape[-1], 1) * inverse_frequency  # (B or 1, 1, T, dim/2)
    return xp.cos(angles).astype(xp.float32), xp.sin(angles).astype(xp.float32)


def _rotate_halves(a, cos, sin, xp):
    """[a1·c − a2·s, a2·c + a1·s] on the halves a1, a2 of the last axis of ``a``, as a fresh array.

    With −s in place of s it is the inverse rotation (the transpose of each 2×2 block).
    """
    half = a.shape[-1] // 2
    a1, a2 = a[..., :half], a[..., half:]
    out = xp.empty_like(a)
    o1, o2 = out[..., :half], out[..., half:]
    xp.multiply(a1, cos, out=o1)
    o1 -= a2 * sin
    xp.multiply(a2, cos, out=o2)
    o2 += a1 * sin
    return out


def rope(x: Tensor, cos, sin) -> Tensor:
    """Rotary position embedding of x (B, H, T, D) in Hugging Face's "rotate_half" layout.

    With halves x1 = x[..., :D/2], x2 = x[..., D/2:] and c, s from ``rope_cache``
    (shape (B or 1, 1, T, D/2)), each pair (x1_i, x2_i) is rotated by its angle:
      y1 = x1·c − x2·s;  y2 = x2·c + x1·s.
    Backward: the inverse rotation of g (a rotation's transpose is its inverse):
      dx1 = g1·c + g2·s;  dx2 = g2·c − g1·s.
    ``cos`` and ``sin`` are constants (arrays or Tensors); they are cast to x's dtype.
    """
    xp = x.xp
    cos, sin = (lift(t, x).data.astype(x.dtype, copy=False) for t in (cos, sin))
    if x.ndim != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.ndim != 4:
        raise ShapeError(f"rope: x must be (B, H, T, D) with D even and cos, sin alike of shape "
                         f"(B or 1, 1, T, D/2); got x {x.shape}, cos {cos.shape}, sin {sin.shape}")
    half_shape = x.shape[:-1] + (x.shape[-1] // 2,)
    try:
        fits = np.broadcast_shapes(cos.shape, half_shape) == half_shape
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"rope: tables of shape {cos.shape} do not fit x of shape {x.shape} "
                         f"(expected (B or 1, 1, T, D/2) = (…, {x.shape[2]}, {x.shape[3] // 2}))")
    out = make_node(_rotate_halves(x.data, cos, sin, xp), (x,), "rope")
    if out.requires_grad:
        out.backward_fn = lambda g: x.accumulate_grad(_rotate_halves(g, cos, -sin, xp), owned=True)
    return out


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gating: y = silu(a) · u, silu(a) = a·σ(a), for gate a and up u of one shape (..., F).

    σ(a) = 1/(1 + e^(−a)), accurate to the last bits for every a: where e^(−a) overflows
    (a < −88 in float32) it is inf and σ(a) = 0, what σ rounds to there anyway (that
    overflow is expected and not warned about). Backward (fused):
      da = g · u · σ(a)·(1 + a·(1 − σ(a)));  du = g · a·σ(a).
    σ(a) is kept for the backward.
    """
    up = lift(up, gate)
    if gate.shape != up.shape:
        raise ShapeError(f"swiglu: gate of shape {gate.shape} and up of shape {up.shape} differ")
    xp = gate.xp
    a = gate.data
    sigma = xp.negative(a)  # (..., F): −a, then σ(a) in place
    with np.errstate(over="ignore"):
        xp.exp(sigma, out=sigma)
    sigma += 1
    xp.reciprocal(sigma, out=sigma)
    value = a * sigma  # silu(a), then times u in place
    value *= up.data
    out = make_node(value, (gate, up), "swiglu")
    if out.requires_grad:
        def backward_fn(g):
            if up.requires_grad:
                du = a * sigma
                du *= g
                up.accumulate_grad(du, owned=True)
            if gate.requires_grad:
                da = 1 - sigma  # then σ(1 + a(1 − σ)) · u · g in place
                da *= a
                da += 1
                da *= sigma
                da *= up.data
                da *= g
                gate.accumulate_grad(da, owned=True)
        out.backward_fn = backward_fn
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None) -> Tensor:
    """Scaled dot-product attention with grouped-query heads and a boolean mask.

    q (B, Hq, T, Dh); k (B, Hkv, S, Dh); v (B, Hkv, S, Dv); Hq = G·Hkv, query head h
    reads kv head h // G. ``mask`` broadcasts to (B, 1, T, S), True = may attend (None: all).
      s = q kᵀ/√Dh, −∞ where masked;  p = softmax_S(s);  y = p v   → (B, Hq, T, Dv).
    A row with no allowed key gets p = 0 and y = 0 (no NaN).

    The G query heads of a kv head are one (G·T)-row block: q is viewed as
    (B, Hkv, G·T, Dh), so every product is one batched matmul and K, V are never repeated.
    Backward (fused softmax), with ĝ = g viewed the same way and D_i = Σ_d ĝ_id y_id
    (= Σ_j p_ij (ĝ v_j)_i, cheaper over Dv than over S):
      dv = pᵀ ĝ;   ds = p ⊙ (ĝ vᵀ − D);   dq = ds k/√Dh;   dk = dsᵀ q/√Dh,
    where the products over the block's G·T rows sum dk and dv over each group.
    Only p (B, Hkv, G·T, S) and y are kept.
    """
    k, v = lift(k, q), lift(v, q)
    xp = q.xp
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] \
            or k.shape[:3] != v.shape[:3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeError(f"attention: need q (B, Hq, T, Dh), k (B, Hkv, S, Dh), v (B, Hkv, S, Dv) with "
                         f"Hq a multiple of Hkv; got q {q.shape}, k {k.shape}, v {v.shape}")
    batch, q_heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    blocks = (batch, kv_heads, groups * length)  # the (B, Hkv, G·T) rows of the grouped view
    scale = head_dim ** -0.5

    scores = (q.data.reshape(*blocks, head_dim) * scale) @ k.data.swapaxes(-1, -2)  # (B, Hkv, G·T, S)
    if mask is not None:
        mask = xp.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if mask.dtype != bool:
            raise TypeError(f"attention: mask must be boolean (True = may attend), got dtype {mask.dtype}")
        full = (batch, 1, length, keys)
        try:
            fits = mask.ndim <= 4 and np.broadcast_shapes(mask.shape, full) == full
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(f"attention: mask of shape {mask.shape} does not broadcast to (B, 1, T, S) = {full}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B or 1, 1, T or 1, S or 1)
        # 0 where allowed, −∞ where not, added over the (B, Hkv, G, T, S) view of the scores
        barrier = xp.where(mask, scores.dtype.type(0), scores.dtype.type(-np.inf))[:, :, None]
        grouped = scores.reshape(batch, kv_heads, groups, length, keys)  # a view
        grouped += barrier
    peak = scores.max(axis=-1, keepdims=True)  # (B, Hkv, G·T, 1); −∞ on a row with no allowed key
    xp.maximum(peak, np.finfo(scores.dtype).min, out=peak)  # …made finite, so that row's e^(s − peak) = 0
    scores -= peak
    probs = xp.exp(scores, out=scores)
    total = probs.sum(axis=-1, keepdims=True)
    xp.maximum(total, 1, out=total)  # ≥ 1 already (the peak term is e^0) unless the row is empty: then 0 → 1
    probs /= total
    value = probs @ v.data  # (B, Hkv, G·T, Dv)
    out = make_node(value.reshape(batch, q_heads, length, v.shape[-1]), (q, k, v), "attention")
    if out.requires_grad:
        def backward_fn(g):
            g = g.reshape(*blocks, v.shape[-1])  # ĝ (B, Hkv, G·T, Dv)
            if v.requires_grad:
                v.accumulate_grad(probs.swapaxes(-1, -2) @ g, owned=True)
            if not (q.requires_grad or k.requires_grad):
                return
            dscores = g @ v.data.swapaxes(-1, -2)  # (B, Hkv, G·T, S) ĝ vᵀ, then ds in place
            dscores -= (g * value).sum(axis=-1, keepdims=True)
            dscores *= probs
            dscores *= scale
            if q.requires_grad:
                q.accumulate_grad((dscores @ k.data).reshape(q.shape), owned=True)
            if k.requires_grad:
                k.accumulate_grad(dscores.swapaxes(-1, -2) @ q.data.reshape(*blocks, head_dim), owned=True)
        out.backward_fn = backward_fn
    return out


def causal_mask(length: int, keys: int = None, key_padding=None, segment_ids=None):
    """Boolean (B or 1, 1, T, S) mask for ``attention``: True = query i may attend to key j.

    Query i sits at absolute position S − T + i (the last T of S positions, as with a KV
    cache) and sees keys j ≤ S − T + i. ``key_padding`` (B, S), True = a real token, hides
    padded keys; ``segment_ids`` (B, T) of packed examples (S = T) keeps each query within
    its own segment. The mask lives on the device of ``key_padding`` / ``segment_ids``
    (NumPy when neither is given; ``attention`` moves it to the queries' device).

    >>> causal_mask(2, 3)[0, 0]
    array([[ True,  True, False],
           [ True,  True,  True]])
    """
    keys = length if keys is None else keys
    if length < 1 or keys < length:
        raise ShapeError(f"causal_mask: need 1 ≤ T ≤ S, got T={length}, S={keys}")
    padding, segments = (None if t is None else _constant(t) for t in (key_padding, segment_ids))
    source = padding if padding is not None else segments
    xp = source.xp if source is not None else np
    if padding is not None and (padding.ndim != 2 or padding.shape[1] != keys):
        raise ShapeError(f"causal_mask: key_padding must be (B, S) = (B, {keys}), got {padding.shape}")
    if segments is not None and (keys != length or segments.ndim != 2 or segments.shape[1] != length):
        raise ShapeError(f"causal_mask: segment_ids must be (B, T) = (B, {length}) with S = T, "
                         f"got {segments.shape} with S={keys}")
    if padding is not None and segments is not None and padding.shape[0] != segments.shape[0]:
        raise ShapeError(f"causal_mask: key_padding {padding.shape} and segment_ids {segments.shape} disagree on B")
    query_position = xp.arange(keys - length, keys)[:, None]  # (T, 1) absolute positions
    allowed = (xp.arange(keys)[None, :] <= query_position)[None, None]  # (1, 1, T, S)
    if padding is not None:
        allowed = allowed & padding.data.astype(bool)[:, None, None, :]  # (B, 1, T, S)
    if segments is not None:
        ids = segments.data
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])  # (B, 1, T, T)
    return allowed


__all__ += ["rms_norm", "rope_cache", "rope", "swiglu", "attention", "causal_mask"]


# ----- the output head and its loss, chunked -----
# A causal LM's last op, hidden (N, D) → logits (N, V) → cross-entropy, costs N·V floats of logits
# and as many of their gradient: 201 MB each for 1,024 tokens of a 49,152-token vocabulary.
# Computed a chunk of rows at a time they never exist whole.

HEAD_CHUNK_BYTES = 64 * 2 ** 20  # default chunk: the rows whose logits fill 64 MiB (341 rows of 49,152 floats)
HEAD_WEIGHT_BLOCK = 8192  # rows of W per product of dW's accumulation


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int = None) -> Tensor:
    """``cross_entropy(linear(hidden, weight), target, ...)`` without ever holding the (N, V) logits.

    hidden (..., D), weight (V, D), target (...) class ids. Only the n rows whose target is
    not ``ignore_index`` are computed, ``chunk_size`` at a time (default: as many as fill
    ``HEAD_CHUNK_BYTES`` of logits). For a chunk C of rows, with s the row scale:
      z_C = h_C Wᵀ  (c, V);   loss_i = lse(z_i) − z_i,t_i   (``cross_entropy``'s fused row
      routine; its CUDA kernel on a GPU);   G_C = s · (softmax(z_C) − onehot(t_C))  (c, V);
      dh_C = G_C W  (c, D);   dW += G_Cᵀ h_C  (V, D).
    s = g/n for "mean", g for "sum" (g the upstream gradient) and g_i per row for "none".
    Ignored rows get dh = 0 and add nothing to dW; "mean" over no rows is NaN with zero gradients.

    Memory: one (c, V) buffer at a time (a chunk's logits, overwritten by their gradient) instead
    of the two (N, V) of ``cross_entropy(linear(h, W), t)``, plus dh (N, D) and dW (V, D), the sizes
    of the inputs (dW is accumulated ``HEAD_WEIGHT_BLOCK`` rows at a time, with no second (V, D)). Time: the same three products as the unchunked head, over n ≤ N rows.
    When a gradient is needed and the reduction is a scalar, dh and dW are computed in the
    forward pass with g = 1 and handed to the first backward (scaled there if g ≠ 1); any
    other backward (reduction "none", or a second backward) runs the chunks again.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    weight = lift(weight, hidden)
    xp = hidden.xp
    if weight.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear_cross_entropy: hidden of shape {hidden.shape} does not fit a weight of shape "
                         f"{weight.shape} (need hidden (..., D) and weight (V, D))")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    classes, width = weight.shape
    chunk_size = head_chunk_size(chunk_size, classes, hidden.data.itemsize, "linear_cross_entropy")
    flat = hidden.data.reshape(-1, width)  # (N, D)
    target, valid = _class_targets(target, hidden.shape[:-1], classes, ignore_index, xp,
                                   f"linear_cross_entropy: hidden of shape {hidden.shape}")
    rows = xp.flatnonzero(valid)  # (n,) the only rows computed
    count = int(rows.size)
    mean_scale = 1.0 / count if count else 0.0

    def block_loss(z, chosen, scale):  # z: the chunk's logits (c, V), overwritten by their gradient
        return _cross_entropy_row_block(z, target[chosen], scale)

    def run_chunks(row_scale, with_grad):  # row_scale: a float or (n,)
        return head_chunks(hidden, weight, rows, chunk_size, block_loss, row_scale, with_grad)

    def rerun(grad):
        upstream = grad.reshape(-1)[rows] if reduction == "none" else \
            float(grad) * (mean_scale if reduction == "mean" else 1.0)
        return run_chunks(upstream, True)[1:]

    precompute = (is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
                  and reduction != "none")
    losses, *gradients = run_chunks(mean_scale if reduction == "mean" else 1.0, precompute)
    if reduction == "none":
        value = xp.zeros(target.shape, dtype=flat.dtype)  # (N,) 0 on ignored rows
        value[rows] = losses
        value = value.reshape(hidden.shape[:-1])
    elif reduction == "sum":
        value = losses.sum()
    else:
        value = losses.sum() * mean_scale if count else np.nan
    return head_loss_node(xp.asarray(value, dtype=flat.dtype), hidden, weight, "linear_cross_entropy",
                          gradients if precompute else None, rerun)


def head_chunk_size(chunk_size, classes: int, itemsize: int, op: str) -> int:
    """The rows per chunk of a chunked head: ``chunk_size`` checked (a positive integer), or by
    default as many as fill ``HEAD_CHUNK_BYTES`` of logits."""
    if chunk_size is None:
        return max(1, HEAD_CHUNK_BYTES // (classes * itemsize))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def head_chunks(hidden: Tensor, weight: Tensor, rows, chunk_size: int, block_loss, row_scale, with_grad: bool):
    """The chunk loop of a loss on a linear head's logits that never holds them all (the shared part
    of ``linear_cross_entropy`` and distillation's ``linear_kd_loss``).

    hidden (..., D), weight (V, D); ``rows`` (n,) the flat rows that count; ``row_scale`` a float or
    (n,). For each chunk C of ``chunk_size`` rows: z_C = h_C Wᵀ (c, V), then ``block_loss(z_C,
    chosen rows, their scale)`` → (losses (c,), G_C (c, V) = the scaled d loss/dz_C, which may be
    written over z_C), and with ``with_grad``: dh_C = G_C W (c, D), dW += G_Cᵀ h_C (V, D), each only
    for an input that requires a gradient. Returns (losses (n,), dh (N, D) or None, dW (V, D) or None).
    """
    xp, flat = hidden.xp, hidden.data.reshape(-1, weight.shape[1])  # (N, D)
    count, classes = int(rows.size), weight.shape[0]
    losses = xp.empty(count, dtype=flat.dtype)
    dh = xp.zeros_like(flat) if with_grad and hidden.requires_grad else None
    dw = xp.zeros_like(weight.data) if with_grad and weight.requires_grad else None
    for start in range(0, count, chunk_size):
        chosen = rows[start:start + chunk_size]  # (c,)
        h = flat[chosen]  # (c, D)
        scale = row_scale if isinstance(row_scale, float) else row_scale[start:start + chunk_size]
        losses[start:start + chosen.size], grad = block_loss(h @ weight.data.T, chosen, scale)  # grad: G_C (c, V)
        if dh is not None:
            # G_C W as (Wᵀ G_Cᵀ)ᵀ: the same numbers, but OpenBLAS runs a (c, V)·(V, D) product with
            # few rows c several times slower than the (D, V)·(V, c) one (measured: 6x at c = 32)
            dh[chosen] = (weight.data.T @ grad.T).T  # (c, D)
        if dw is not None:  # G_Cᵀ h_C a block of W's rows at a time: a (block, D) temporary, not a (V, D) one
            for v in range(0, classes, HEAD_WEIGHT_BLOCK):
                dw[v:v + HEAD_WEIGHT_BLOCK] += grad[:, v:v + HEAD_WEIGHT_BLOCK].T @ h  # (block, D)
        del grad  # before the next chunk's logits exist: one (c, V) buffer at a time, not two
    return losses, dh, dw


def head_loss_node(value, hidden: Tensor, weight: Tensor, name: str, gradients, rerun) -> Tensor:
    """The graph node of a chunked head's loss ``value``. ``gradients``: (dh, dW) computed in the
    forward for an upstream gradient of 1, handed to the first backward (scaled in place if g ≠ 1),
    or None; any other backward calls ``rerun(g)`` → (dh, dW), which runs the chunks again."""
    out = make_node(value, (hidden, weight), name)
    if out.requires_grad:
        handed = [gradients]

        def backward_fn(grad):
            if handed[0] is not None:  # the forward's gradients, for g = 1: scaled in place, then given away
                dh, dw = handed[0]
                handed[0] = None
                if not bool((grad == 1).all()):
                    for array in (dh, dw):
                        if array is not None:
                            array *= grad
            else:
                dh, dw = rerun(grad)
            if dh is not None:
                hidden.accumulate_grad(dh.reshape(hidden.shape), owned=True)
            if dw is not None:
                weight.accumulate_grad(dw, owned=True)
        out.backward_fn = backward_fn
    return out


def _cross_entropy_row_block(z, target, row_scale):
    """Losses (c,) and row_scale · d loss/dz (c, V) of a block of rows that all count (no
    ignored target), the gradient written over z (the caller's own logits): the CUDA kernel
    on a GPU, ``_cross_entropy_rows`` on the CPU. ``row_scale``: a float or one per row (c,)."""
    if isinstance(z, np.ndarray):
        return _cross_entropy_rows(z, target, np.ones(target.shape, bool), 0.0, 0.0, row_scale, out=z)
    from .cuda import softmax_cross_entropy
    per_row = not isinstance(row_scale, float)
    loss, _, grad = softmax_cross_entropy(z, target, row_scale=1.0 if per_row else row_scale, in_place=True)
    if per_row:
        grad *= row_scale.astype(grad.dtype)[:, None]
    return loss, grad


__all__ += ["linear_cross_entropy"]
