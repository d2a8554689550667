"""Tensor: an array of the active backend plus reverse-mode autograd.

Each op computes its output and, right beside it, the closure that accumulates
the gradient into its inputs (micrograd's shape, vectorised over ``xp``). The
closure receives the output's gradient as its argument and never refers to the
output itself, so a graph holds no reference cycles: it is freed the moment its
last tensor is dropped, without waiting for Python's cycle collector.
``backward()`` sorts the graph depth-first without recursion and runs the
closures in reverse. Gradients are raw backend arrays, never Tensors.

Defining an op. Every hand-written derivative, here for the primitives and in
``tinysft.functional`` for the fused composites, uses the same three names:

    out = make_node(value, parents, "op_name")   # requires_grad iff grad mode is on
    if out.requires_grad:                        # and some parent requires it
        def backward_fn(g):                      # g: upstream gradient, shape of out
            if x.requires_grad:
                x.accumulate_grad(dx)            # summed back to x's shape; owned=True
        out.backward_fn = backward_fn            # when dx is a fresh array

``lift(value, like)`` turns a number or array into a constant on ``like``'s
device and dtype (and checks that a Tensor is on ``like``'s device).

>>> a = tensor([1.0, 2.0], requires_grad=True)
>>> (a * a).sum().backward()
>>> a.grad
array([2., 4.], dtype=float32)
"""
from contextlib import contextmanager

import numpy as np

from .backend import DeviceError, device_of, scatter_add, to_device, xp_for


class ShapeError(ValueError):
    """Shapes that do not fit an op; the message names both shapes."""


_grad_enabled = True


@contextmanager
def no_grad():
    """Inside this block ops record no graph (inference, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, back to ``shape``."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim if ndim else a for a in axes)


def _expand_reduced(grad, shape, axis, keepdims):
    """Broadcast the gradient of a reduction back over the reduced axes."""
    if not keepdims:
        grad = grad.reshape([1 if i in _normalize_axes(axis, len(shape)) else n
                             for i, n in enumerate(shape)])
    return grad


def _shape_arg(shape):
    """``f(2, 3)`` and ``f((2, 3))`` both mean the shape (2, 3)."""
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def make_node(value, parents, op: str) -> "Tensor":
    """A new graph node holding ``value`` (an array of the parents' backend).

    It requires a gradient iff grad mode is on and some parent requires one, and
    keeps its parents only then, so a graph built under ``no_grad`` holds nothing.
    Set ``out.backward_fn`` when ``out.requires_grad``.
    """
    requires = _grad_enabled and any(p.requires_grad for p in parents)
    return Tensor(value, requires_grad=requires, _parents=tuple(parents) if requires else (), _op=op)


def lift(value, like: "Tensor") -> "Tensor":
    """``value`` as a Tensor next to ``like``: a Tensor is checked to be on ``like``'s device and
    returned as is; a Python number or array becomes a constant of ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        if value.device != like.device:
            raise DeviceError(f"tensors on different devices: {like.device} and {value.device}")
        return value
    return Tensor(like.xp.asarray(value, dtype=like.dtype))


def _raw_index(index):
    """An index with Tensors replaced by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


class Tensor:
    """An n-dimensional array that remembers how it was computed.

    ``data``: the backend array; ``grad``: an array of the same shape once
    ``backward`` has reached this tensor (leaves keep it, accumulating across
    calls; intermediate gradients are freed after use).
    """

    __array_priority__ = 100  # numpy scalars defer to Tensor.__radd__ etc.

    def __init__(self, data, requires_grad=False, _parents=(), _op=""):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = _parents
        self.backward_fn = None  # g -> None: accumulates into the parents (see make_node)
        self._op = _op

    # ----- properties -----
    @property
    def xp(self):
        return xp_for(self.device)

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = ", device='cuda'" if self.device == "cuda" else ""
        return f"tensor({self.numpy()!r}{device}{grad})"

    # ----- conversion -----
    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (copied from the GPU if needed)."""
        return to_device(self.data, "cpu")

    def item(self):
        if self.data.size != 1:
            raise ShapeError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """The same values, cut from the graph (shares memory)."""
        return Tensor(self.data)

    def to(self, device: str) -> "Tensor":
        """A copy on ``device`` that is a leaf of its own; no copy if already there."""
        if device == self.device:
            return self
        xp_for(device)  # raises a clear DeviceError if the device is absent
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype) -> "Tensor":
        """Cast; the gradient is cast back to this tensor's dtype."""
        out = make_node(self.data.astype(dtype), (self,), "astype")
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(grad)
        return out

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    # ----- graph plumbing -----
    def accumulate_grad(self, grad, owned: bool = False):
        """Add ``grad`` (summed back to this shape) into ``self.grad``.

        ``owned``: ``grad`` is a fresh array no other node holds, so a leaf may
        keep it as its gradient without a copy (e.g. an embedding table's).
        """
        if not self.requires_grad:
            return
        grad = unbroadcast(grad, self.shape)
        if grad.dtype != self.dtype:
            grad = grad.astype(self.dtype)
        if self.grad is None:
            # a leaf owns its gradient (optimizers edit it in place); an
            # intermediate may share the array since nothing edits it.
            self.grad = self.xp.array(grad, copy=True) if not (self._parents or owned) else grad
        elif self._parents:
            self.grad = self.grad + grad
        else:
            self.grad += grad

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is the upstream gradient; it may be omitted only for a
        one-element tensor (it is then 1).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was built under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} "
                                   "needs a gradient argument of the same shape")
            grad = self.xp.ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if tuple(grad.shape) != self.shape:
            raise ShapeError(f"backward(): gradient of shape {tuple(grad.shape)} for a tensor of shape {self.shape}")

        order = self._topological_order()
        self.accumulate_grad(self.xp.asarray(grad, dtype=self.dtype))
        for node in reversed(order):
            if node.backward_fn is not None and node.grad is not None:
                node.backward_fn(node.grad)
            if node._parents:
                node.grad = None  # intermediate gradients are not kept

    def _topological_order(self):
        """Nodes that need a gradient, each after all of its inputs (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents
                         if p.requires_grad and id(p) not in visited)
        return order

    # ----- elementwise binary ops -----
    def _broadcast_op(self, other, fn, op):
        try:
            return fn(self.data, other.data)
        except ValueError as error:
            raise ShapeError(f"{op}: shapes {self.shape} and {other.shape} do not broadcast") from error

    def __add__(self, other):
        """a + b; d/da = 1, d/db = 1 (summed over broadcast axes)."""
        other = lift(other, self)
        out = make_node(self._broadcast_op(other, self.xp.add, "add"), (self, other), "+")
        if out.requires_grad:
            def backward_fn(grad):
                self.accumulate_grad(grad)
                other.accumulate_grad(grad)
            out.backward_fn = backward_fn
        return out

    def __mul__(self, other):
        """a * b; d/da = b, d/db = a."""
        other = lift(other, self)
        out = make_node(self._broadcast_op(other, self.xp.multiply, "mul"), (self, other), "*")
        if out.requires_grad:
            def backward_fn(grad):
                if self.requires_grad:
                    self.accumulate_grad(grad * other.data)
                if other.requires_grad:
                    other.accumulate_grad(grad * self.data)
            out.backward_fn = backward_fn
        return out

    def __pow__(self, exponent):
        """x ** p for a scalar p; d/dx = p x^(p-1)."""
        if isinstance(exponent, Tensor):
            raise TypeError("pow takes a scalar exponent; for x ** y with tensor y use exp(y * log(x))")
        if exponent == 0:  # d/dx x^0 = 0, also at x = 0 (PyTorch's convention)
            return self._unary(self.data ** exponent, lambda: self.xp.zeros_like(self.data), "pow")
        return self._unary(self.data ** exponent, lambda: exponent * self.data ** (exponent - 1), "pow")

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-lift(other, self))

    def __rsub__(self, other):
        return lift(other, self) - self

    def __truediv__(self, other):
        if isinstance(other, Tensor):
            return self * other ** -1.0
        return self * (1.0 / other)

    def __rtruediv__(self, other):
        return lift(other, self) * self ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    # ----- elementwise unary ops: value and local derivative side by side -----
    def _unary(self, value, local_grad, op):
        """out = f(x) with ``local_grad()`` = f'(x), evaluated only when needed."""
        out = make_node(value, (self,), op)
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(grad * local_grad())
        return out

    def exp(self):
        """e^x; d/dx = e^x."""
        value = self.xp.exp(self.data)
        return self._unary(value, lambda: value, "exp")

    def log(self):
        """ln x; d/dx = 1/x."""
        return self._unary(self.xp.log(self.data), lambda: 1.0 / self.data, "log")

    def sqrt(self):
        """√x; d/dx = 1/(2√x)."""
        value = self.xp.sqrt(self.data)
        return self._unary(value, lambda: 0.5 / value, "sqrt")

    def abs(self):
        """|x|; d/dx = sign(x) (0 at 0)."""
        return self._unary(self.xp.abs(self.data), lambda: self.xp.sign(self.data), "abs")

    def tanh(self):
        """tanh x; d/dx = 1 − tanh² x."""
        value = self.xp.tanh(self.data)
        return self._unary(value, lambda: 1.0 - value * value, "tanh")

    def sigmoid(self):
        """σ(x) = 1/(1+e^−x), computed as exp(−log(1+e^−x)); d/dx = σ(1−σ)."""
        value = self.xp.exp(-self.xp.logaddexp(0, -self.data)).astype(self.dtype)
        return self._unary(value, lambda: value * (1.0 - value), "sigmoid")

    def relu(self):
        """max(x, 0); d/dx = [x > 0]."""
        return self._unary(self.xp.maximum(self.data, 0), lambda: self.data > 0, "relu")

    def gelu(self, approximate: str = "none"):
        """GELU. Exact: x·Φ(x), d/dx = Φ(x) + x·φ(x).

        ``approximate='tanh'``: ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³),
        d/dx = ½(1 + tanh u) + ½x(1 − tanh² u)·√(2/π)(1 + 3·0.044715x²).
        (Evaluated in ``special``: float32 in cache-sized chunks spread over the cores; the
        backward multiplies by g in the same chunks.)
        """
        from .special import gelu, gelu_backward
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        value, saved = gelu(self.data, approximate, keep=_grad_enabled and self.requires_grad)
        out = make_node(value, (self,), "gelu")
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(
                gelu_backward(grad, self.data, saved, approximate), owned=True)
        return out

    # ----- reductions -----
    def sum(self, axis=None, keepdims=False):
        """Σ over ``axis``; the gradient is broadcast back over the summed axes."""
        out = make_node(self.data.sum(axis=axis, keepdims=keepdims), (self,), "sum")
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(
                self.xp.broadcast_to(_expand_reduced(grad, self.shape, axis, keepdims), self.shape))
        return out

    def mean(self, axis=None, keepdims=False):
        """Σx / n over ``axis``."""
        count = int(np.prod([self.shape[a] for a in _normalize_axes(axis, self.ndim)]))
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / count)

    def max(self, axis=None, keepdims=False):
        """max over ``axis``; the gradient goes to the maxima, split evenly between ties."""
        value = self.data.max(axis=axis, keepdims=True)
        out = make_node(value if keepdims else value.reshape(
            [n for i, n in enumerate(self.shape) if i not in _normalize_axes(axis, self.ndim)]), (self,), "max")
        if out.requires_grad:
            def backward_fn(grad):
                winners = (self.data == value).astype(self.dtype)
                winners /= winners.sum(axis=axis, keepdims=True)
                self.accumulate_grad(winners * _expand_reduced(grad, self.shape, axis, keepdims))
            out.backward_fn = backward_fn
        return out

    def var(self, axis=None, keepdims=False, correction=1):
        """Σ(x − mean)² / (n − correction), PyTorch's default correction=1 (unbiased).

        With n ≤ correction the divisor is 0, giving NaN (or inf), as in PyTorch.
        """
        count = int(np.prod([self.shape[a] for a in _normalize_axes(axis, self.ndim)]))
        centered = self - self.mean(axis=axis, keepdims=True)
        divisor = max(count - correction, 0)
        return (centered * centered).sum(axis=axis, keepdims=keepdims) * (1.0 / divisor if divisor else np.inf)

    # ----- shape ops -----
    def reshape(self, *shape):
        shape = _shape_arg(shape)
        try:
            value = self.data.reshape(shape)
        except ValueError as error:
            raise ShapeError(f"reshape: cannot reshape {self.shape} ({self.size} elements) into {shape}") from error
        out = make_node(value, (self,), "reshape")
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(grad.reshape(self.shape))
        return out

    view = reshape

    def permute(self, *axes):
        """Reorder axes; the gradient is permuted back by the inverse order."""
        axes = _shape_arg(axes)
        if sorted(a % self.ndim for a in axes) != list(range(self.ndim)):
            raise ShapeError(f"permute: {axes} is not an ordering of the {self.ndim} axes of shape {self.shape}")
        out = make_node(self.data.transpose(axes), (self,), "permute")
        if out.requires_grad:
            inverse = np.argsort([a % self.ndim for a in axes])
            out.backward_fn = lambda grad: self.accumulate_grad(grad.transpose(inverse))
        return out

    def transpose(self, dim0=-2, dim1=-1):
        """Swap two axes (PyTorch's ``transpose(dim0, dim1)``)."""
        axes = list(range(self.ndim))
        axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
        return self.permute(*axes)

    @property
    def T(self):
        return self.permute(*reversed(range(self.ndim)))

    def __getitem__(self, index):
        """Slicing and integer-array indexing; backward scatter-adds (repeats sum)."""
        index = _raw_index(index)
        out = make_node(self.data[index], (self,), "getitem")
        if out.requires_grad:
            def backward_fn(grad):
                full = self.xp.zeros(self.shape, dtype=self.dtype)
                scatter_add(full, index, grad)
                self.accumulate_grad(full, owned=True)
            out.backward_fn = backward_fn
        return out

    # ----- matmul -----
    def __matmul__(self, other):
        """a @ b (batched, broadcasting); d/da = g @ bᵀ, d/db = aᵀ @ g."""
        other = lift(other, self)
        a, b = self.data, other.data
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[0 if b.ndim == 1 else -2]:
            raise ShapeError(f"matmul: shapes {self.shape} and {other.shape} do not align")
        if b.ndim == 2 and a.ndim > 2:
            # (..., K) @ (K, N): one large GEMM over the flattened rows instead of one per batch
            # entry; the weight gradient then is a single (K, rows) @ (rows, N) product too.
            return (self.reshape(-1, a.shape[-1]) @ other).reshape(*a.shape[:-1], b.shape[-1])
        try:
            value = a @ b
        except ValueError as error:
            raise ShapeError(f"matmul: batch shapes of {self.shape} and {other.shape} do not broadcast") from error
        out = make_node(value, (self, other), "matmul")
        if out.requires_grad:
            def backward_fn(grad):
                # treat vectors as (1, K) and (K, 1) matrices, then undo
                a2 = a[None, :] if a.ndim == 1 else a
                b2 = b[:, None] if b.ndim == 1 else b
                g = grad[..., None] if b.ndim == 1 else grad
                g = self.xp.expand_dims(g, -2) if a.ndim == 1 else g
                if self.requires_grad:
                    self.accumulate_grad(unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape))
                if other.requires_grad:
                    other.accumulate_grad(unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(b.shape))
            out.backward_fn = backward_fn
        return out

    def __rmatmul__(self, other):
        return lift(other, self) @ self

    # ----- comparisons (no gradient) -----
    def __lt__(self, other):
        return Tensor(self.data < (other.data if isinstance(other, Tensor) else other))

    def __gt__(self, other):
        return Tensor(self.data > (other.data if isinstance(other, Tensor) else other))

    def argmax(self, axis=None):
        return Tensor(self.data.argmax(axis=axis))

    # ----- softmax family -----
    def log_softmax(self, axis=-1):
        """log softmax(x) = x − log Σ e^x, stable (max subtracted).

        Backward (fused): dx = g − softmax(x) · Σ g.
        """
        xp = self.xp
        shifted = self.data - self.data.max(axis=axis, keepdims=True)
        value = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        out = make_node(value, (self,), "log_softmax")
        if out.requires_grad:
            out.backward_fn = lambda grad: self.accumulate_grad(
                grad - xp.exp(value) * grad.sum(axis=axis, keepdims=True))
        return out

    def softmax(self, axis=-1):
        """softmax(x)_i = e^(x_i) / Σ_j e^(x_j), as exp(log_softmax(x))."""
        return self.log_softmax(axis).exp()


# ----- joining and selecting -----
def cat(tensors, axis=0) -> Tensor:
    """Concatenate along ``axis``; the gradient is split back into the pieces.

    >>> cat([tensor([1.0]), tensor([2.0, 3.0])])
    tensor(array([1., 2., 3.], dtype=float32))
    """
    tensors = list(tensors)
    first = tensors[0]
    tensors = [lift(t, first) for t in tensors]  # all on one device
    try:
        value = first.xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as error:
        raise ShapeError(f"cat: shapes {[t.shape for t in tensors]} do not fit along axis {axis}") from error
    out = make_node(value, tuple(tensors), "cat")
    if out.requires_grad:
        def backward_fn(grad):
            bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]
            for t, piece in zip(tensors, first.xp.split(grad, bounds, axis=axis)):
                t.accumulate_grad(piece)
        out.backward_fn = backward_fn
    return out


def where(condition, a, b) -> Tensor:
    """Elementwise ``a`` where condition holds, else ``b``; each gets the gradient of its picks.

    >>> where(tensor([True, False]), tensor([1.0, 2.0]), 0.0)
    tensor(array([1., 0.], dtype=float32))
    """
    like = a if isinstance(a, Tensor) else b
    a, b = lift(a, like), lift(b, like)
    cond = condition.data if isinstance(condition, Tensor) else like.xp.asarray(condition)
    try:
        value = like.xp.where(cond, a.data, b.data)
    except ValueError as error:
        raise ShapeError(f"where: shapes {cond.shape}, {a.shape} and {b.shape} do not broadcast") from error
    out = make_node(value, (a, b), "where")
    if out.requires_grad:
        def backward_fn(grad):
            zero = grad.dtype.type(0)
            a.accumulate_grad(like.xp.where(cond, grad, zero))
            b.accumulate_grad(like.xp.where(cond, zero, grad))
        out.backward_fn = backward_fn
    return out


def tensor(data, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    """Make a leaf Tensor. Python floats and lists default to float32; arrays keep their dtype."""
    if isinstance(data, Tensor):
        data = data.data
    is_array = hasattr(data, "dtype")
    array = xp_for(device).asarray(to_device(data, device) if is_array else data, dtype=dtype)
    if dtype is None and not is_array and array.dtype == np.float64:
        array = array.astype(np.float32)
    if requires_grad and array.dtype.kind != "f":
        raise TypeError(f"only floating tensors can require grad, got dtype {array.dtype}")
    return Tensor(array, requires_grad=requires_grad)


def zeros(*shape, dtype=np.float32, device="cpu", requires_grad=False) -> Tensor:
    shape = _shape_arg(shape)
    return Tensor(xp_for(device).zeros(shape, dtype=dtype), requires_grad=requires_grad)


def ones(*shape, dtype=np.float32, device="cpu", requires_grad=False) -> Tensor:
    shape = _shape_arg(shape)
    return Tensor(xp_for(device).ones(shape, dtype=dtype), requires_grad=requires_grad)


def randn(*shape, dtype=np.float32, device="cpu", requires_grad=False, generator=None) -> Tensor:
    """Standard normal samples from ``generator`` (default: the device's seeded generator)."""
    from .rng import generator as default_generator
    shape = _shape_arg(shape)
    rng = generator or default_generator(device)
    return Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=requires_grad)
