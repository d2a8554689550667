"""Float64 NumPy references for the kernels in csrc/: plain formulas, no tricks beyond the max shift."""
import numpy as np


def cross_entropy_reference(logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, row_scale=None):
    """(loss [N], lse [N], dlogits [N, V]) in float64, PyTorch semantics.

    lse = log sum_j exp x_j;  q = (1 - eps) onehot(t) + eps / V
    loss = -sum_j q_j log softmax_j + z lse^2;  dlogits = row_scale (softmax (1 + 2 z lse) - q)
    Rows with t == ignore_index have loss 0 and gradient 0; row_scale defaults to 1 / #valid rows.
    """
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    n, v = x.shape
    valid = t != ignore_index
    if row_scale is None:
        row_scale = 1.0 / max(int(valid.sum()), 1)
    m = x.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        p = e / s
        tt = np.where(valid, t, 0)
        x_t = x[np.arange(n), tt]
        loss = (1 - label_smoothing) * (lse - x_t)
        if label_smoothing:
            loss = loss + label_smoothing * (lse - x.mean(axis=1))
        if z_loss:
            loss = loss + z_loss * lse**2
        q = np.full((n, v), label_smoothing / v)
        q[np.arange(n), tt] += 1 - label_smoothing
        grad = (p * (1 + 2 * z_loss * lse[:, None]) - q) * row_scale
    loss = np.where(valid, loss, 0.0)
    grad[~valid] = 0.0
    return loss, lse, grad


def clip_grad_norm_reference(grads, max_norm):
    """(total_norm, clipped grads) in float64: norm = sqrt(sum of squares), scale = min(1, max_norm / (norm + 1e-6))."""
    flat = [np.asarray(g, dtype=np.float64).ravel() for g in grads]
    norm = float(np.sqrt(sum(float(np.dot(f, f)) for f in flat)))
    scale = min(1.0, max_norm / (norm + 1e-6)) if np.isfinite(norm) else 1.0
    return norm, [np.asarray(g, dtype=np.float64) * scale for g in grads]
