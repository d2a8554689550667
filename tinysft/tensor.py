"""Tensor: an array of the active backend plus reverse-mode autograd.

Each op computes its output and, right beside it, the closure that accumulates
the gradient into its inputs (micrograd's shape, vectorised over ``xp``). The
closure receives the output's gradient as its argument and never refers to the
output itself, so a graph holds no reference cycles: it is freed the moment its
last tensor is dropped, without waiting for Python's cycle collector.
``backward()`` sorts the graph depth-first without recursion and runs the
closures in reverse. Gradients are raw backend arrays, never Tensors.

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
        self._backward = None
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
        out = self._make(self.data.astype(dtype), (self,), "astype")
        if out.requires_grad:
            out._backward = lambda grad: self._accumulate(grad)
        return out

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    # ----- graph plumbing -----
    def _make(self, data, parents, op):
        """A new node; it keeps its parents only when a gradient must flow."""
        requires = _grad_enabled and any(p.requires_grad for p in parents)
        return Tensor(data, requires_grad=requires, _parents=parents if requires else (), _op=op)

    def _lift(self, other) -> "Tensor":
        """Turn a Python number or array into a constant Tensor on this device."""
        if isinstance(other, Tensor):
            if other.device != self.device:
                raise DeviceError(f"tensors on different devices: {self.device} and {other.device}")
            return other
        return Tensor(self.xp.asarray(other, dtype=self.dtype))

    def _accumulate(self, grad, owned: bool = False):
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
        self._accumulate(self.xp.asarray(grad, dtype=self.dtype))
        for node in reversed(order):
            if node._backward is not None and node.grad is not None:
                node._backward(node.grad)
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
        other = self._lift(other)
        out = self._make(self._broadcast_op(other, self.xp.add, "add"), (self, other), "+")
        if out.requires_grad:
            def _backward(grad):
                self._accumulate(grad)
                other._accumulate(grad)
            out._backward = _backward
        return out

    def __mul__(self, other):
        """a * b; d/da = b, d/db = a."""
        other = self._lift(other)
        out = self._make(self._broadcast_op(other, self.xp.multiply, "mul"), (self, other), "*")
        if out.requires_grad:
            def _backward(grad):
                if self.requires_grad:
                    self._accumulate(grad * other.data)
                if other.requires_grad:
                    other._accumulate(grad * self.data)
            out._backward = _backward
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
        return self + (-self._lift(other))

    def __rsub__(self, other):
        return self._lift(other) - self

    def __truediv__(self, other):
        if isinstance(other, Tensor):
            return self * other ** -1.0
        return self * (1.0 / other)

    def __rtruediv__(self, other):
        return self._lift(other) * self ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    # ----- elementwise unary ops: value and local derivative side by side -----
    def _unary(self, value, local_grad, op):
        """out = f(x) with ``local_grad()`` = f'(x), evaluated only when needed."""
        out = self._make(value, (self,), op)
        if out.requires_grad:
            out._backward = lambda grad: self._accumulate(grad * local_grad())
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
        (Evaluated in ``special``: float32 in cache-sized chunks.)
        """
        from .special import gelu, gelu_derivative
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        value, saved = gelu(self.data, approximate)
        return self._unary(value, lambda: gelu_derivative(self.data, saved, approximate), "gelu")

    # ----- reductions -----
    def sum(self, axis=None, keepdims=False):
        """Σ over ``axis``; the gradient is broadcast back over the summed axes."""
        out = self._make(self.data.sum(axis=axis, keepdims=keepdims), (self,), "sum")
        if out.requires_grad:
            out._backward = lambda grad: self._accumulate(
                self.xp.broadcast_to(_expand_reduced(grad, self.shape, axis, keepdims), self.shape))
        return out

    def mean(self, axis=None, keepdims=False):
        """Σx / n over ``axis``."""
        count = int(np.prod([self.shape[a] for a in _normalize_axes(axis, self.ndim)]))
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / count)

    def max(self, axis=None, keepdims=False):
        """max over ``axis``; the gradient goes to the maxima, split evenly between ties."""
        value = self.data.max(axis=axis, keepdims=True)
        out = self._make(value if keepdims else value.reshape(
            [n for i, n in enumerate(self.shape) if i not in _normalize_axes(axis, self.ndim)]), (self,), "max")
        if out.requires_grad:
            def _backward(grad):
                winners = (self.data == value).astype(self.dtype)
                winners /= winners.sum(axis=axis, keepdims=True)
                self._accumulate(winners * _expand_reduced(grad, self.shape, axis, keepdims))
            out._backward = _backward
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
        out = self._make(value, (self,), "reshape")
        if out.requires_grad:
            out._backward = lambda grad: self._accumulate(grad.reshape(self.shape))
        return out

    view = reshape

    def permute(self, *axes):
        """Reorder axes; the gradient is permuted back by the inverse order."""
        axes = _shape_arg(axes)
        if sorted(a % self.ndim for a in axes) != list(range(self.ndim)):
            raise ShapeError(f"permute: {axes} is not an ordering of the {self.ndim} axes of shape {self.shape}")
        out = self._make(self.data.transpose(axes), (self,), "permute")
        if out.requires_grad:
            inverse = np.argsort([a % self.ndim for a in axes])
            out._backward = lambda grad: self._accumulate(grad.transpose(inverse))
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
        out = self._make(self.data[index], (self,), "getitem")
        if out.requires_grad:
            def _backward(grad):
                full = self.xp.zeros(self.shape, dtype=self.dtype)
                scatter_add(full, index, grad)
                self._accumulate(full, owned=True)
            out._backward = _backward
        return out

    # ----- matmul -----
    def __matmul__(self, other):
        """a @ b (batched, broadcasting); d/da = g @ bᵀ, d/db = aᵀ @ g."""
        other = self._lift(other)
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
        out = self._make(value, (self, other), "matmul")
        if out.requires_grad:
            def _backward(grad):
                # treat vectors as (1, K) and (K, 1) matrices, then undo
                a2 = a[None, :] if a.ndim == 1 else a
                b2 = b[:, None] if b.ndim == 1 else b
                g = grad[..., None] if b.ndim == 1 else grad
                g = self.xp.expand_dims(g, -2) if a.ndim == 1 else g
                if self.requires_grad:
                    self._accumulate(unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape))
                if other.requires_grad:
                    other._accumulate(unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(b.shape))
            out._backward = _backward
        return out

    def __rmatmul__(self, other):
        return self._lift(other) @ self

    # ----- comparisons (no gradient) -----
    def __lt__(self, other):
        return Tensor(self.data < (other.data if isinstance(other, Tensor) else other))

    def __gt__(self, other):
        return Tensor(self.data > (other.data if isinstance(other, Tensor) else other))

    def argmax(self, axis=None):
        return Tensor(self.data.argmax(axis=axis))

    # ----- conveniences that compose the functional ops -----
    def softmax(self, axis=-1):
        from .functional import softmax
        return softmax(self, axis)

    def log_softmax(self, axis=-1):
        from .functional import log_softmax
        return log_softmax(self, axis)


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
