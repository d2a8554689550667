"""Module and Parameter: the containers every layer and model is built from.

PyTorch's names and semantics. Assigning a ``Parameter`` or a ``Module`` to an
attribute registers it, in assignment order, so ``named_parameters()`` yields
dotted names exactly as PyTorch does (``encoder.layer.0.attention.self.query.weight``)
and a state dict saved here lines up with one saved there.

>>> class Net(Module):
...     def __init__(self):
...         super().__init__()
...         self.proj = Linear(4, 2)
...     def forward(self, x):          # x: (B, 4)
...         return self.proj(x)        # (B, 2)
>>> [name for name, _ in Net().named_parameters()]
['proj.weight', 'proj.bias']
"""
from collections import OrderedDict, namedtuple
from contextlib import contextmanager
from fnmatch import fnmatchcase

import numpy as np

from ..backend import to_device, xp_for
from ..tensor import Tensor


class StateDictError(RuntimeError):
    """A state dict that does not fit a module; ``missing``, ``unexpected`` and
    ``mismatched`` ({name: (expected shape, given shape)}) list every problem."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=None):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Parameter(Tensor):
    """A trainable leaf Tensor: floating point, ``requires_grad=True`` by default.

    Integer data is cast to float32; float arrays keep their dtype (float64
    parameters are what gradcheck needs).
    """

    def __init__(self, data, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "dtype"):
            data = np.asarray(data, dtype=np.float32)
        if data.dtype.kind != "f":
            data = data.astype(np.float32)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


def _matches(name: str, patterns) -> bool:
    """fnmatch on the full dotted name; a pattern naming a module also matches everything in it."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


class Module:
    """Base class of every layer: registers Parameters and sub-Modules on assignment.

    Subclasses call ``super().__init__()`` first, assign their parts as
    attributes, and define ``forward``; ``module(x)`` calls ``forward(x)``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ----- registration -----
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() was called "
                                 f"(call super().__init__() first in {type(self).__name__}.__init__)")
        params, modules = self._parameters, self._modules
        if isinstance(value, Parameter):
            self.__dict__.pop(name, None)
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            self.__dict__.pop(name, None)
            params.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} "
                                "(wrap it in nn.Parameter, or assign None)")
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to sub-module {name!r} "
                                "(expected a Module or None)")
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # only reached when normal lookup fails: parameters and sub-modules live in the registries
        d = self.__dict__
        if "_parameters" in d and name in d["_parameters"]:
            return d["_parameters"][name]
        if "_modules" in d and name in d["_modules"]:
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    def register_parameter(self, name: str, param):
        """``setattr(self, name, param)`` for a Parameter or None (a declared but absent parameter)."""
        if param is None:
            self._parameters[name] = None
        else:
            setattr(self, name, param)

    def add_module(self, name: str, module):
        if module is None:
            self._modules[name] = None
        else:
            setattr(self, name, module)

    # ----- calling -----
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ----- traversal -----
    def children(self):
        return (m for _, m in self.named_children())

    def named_children(self):
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def named_modules(self, prefix: str = "", _memo=None):
        """``(dotted name, module)`` for this module ('' by default) and every descendant, depth first."""
        memo = set() if _memo is None else _memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:
                yield from module.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        """``(dotted name, Parameter)`` in registration order; a shared parameter appears once."""
        seen = set()
        owners = self.named_modules(prefix) if recurse else [(prefix, self)]
        for owner_name, owner in owners:
            for name, p in owner._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{owner_name}.{name}" if owner_name else name), p

    def parameters(self, recurse: bool = True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def get_submodule(self, target: str) -> "Module":
        module = self
        for part in target.split(".") if target else []:
            if part not in module._modules or module._modules[part] is None:
                raise AttributeError(f"{type(module).__name__} has no sub-module {part!r} (looking up {target!r})")
            module = module._modules[part]
        return module

    def apply(self, fn):
        """Call ``fn(module)`` on every sub-module, then on self (as PyTorch)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ----- modes and gradients -----
    def train(self, mode: bool = True):
        """Training mode (dropout active) for this module and all below it; returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def requires_grad_(self, requires_grad: bool = True):
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    def _set_requires_grad(self, patterns, flag: bool, missing_ok: bool):
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [name for name, p in self.named_parameters() if _matches(name, patterns)]
        if not names and not missing_ok:
            sample = ", ".join(name for name, _ in list(self.named_parameters())[:6])
            raise ValueError(f"no parameter name matches {patterns} (names look like: {sample}, ...)")
        params = dict(self.named_parameters())
        for name in names:
            params[name].requires_grad = flag
        return names

    def freeze(self, pattern="*", missing_ok: bool = False):
        """Stop gradients for parameters whose dotted name matches ``pattern`` (fnmatch: ``*``, ``?``,
        ``[..]``; a module's name matches all of its parameters, e.g. ``"embeddings"``,
        ``"encoder.layer.[0-3]"``). A list of patterns is allowed. Returns the matched names;
        raises ValueError when nothing matches unless ``missing_ok``."""
        return self._set_requires_grad(pattern, False, missing_ok)

    def unfreeze(self, pattern="*", missing_ok: bool = False):
        """The inverse of ``freeze``; returns the matched names."""
        return self._set_requires_grad(pattern, True, missing_ok)

    # ----- devices and dtypes -----
    def to(self, device: str):
        """Move every parameter (and its gradient) to ``device`` in place; the Parameter
        objects stay the same, so an optimizer built before still holds them."""
        xp_for(device)  # a clear DeviceError if absent
        for p in self.parameters():
            p.data = to_device(p.data, device)
            if p.grad is not None:
                p.grad = to_device(p.grad, device)
        return self

    def astype(self, dtype):
        """Cast every parameter to ``dtype`` in place (gradients are dropped)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    # ----- state -----
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """``{dotted name: NumPy copy}`` of every parameter (copies: later training does not change it)."""
        return OrderedDict((name, np.array(p.numpy(), copy=True)) for name, p in self.named_parameters())

    def load_state_dict(self, state, strict: bool = True) -> IncompatibleKeys:
        """Copy values from ``state`` (name → array or Tensor) into the parameters.

        Values are cast to each parameter's dtype and put on its device. A shape
        mismatch is always an error; with ``strict`` missing and unexpected
        names are too. The error lists every problem at once. Returns
        ``(missing_keys, unexpected_keys)`` as PyTorch does.
        """
        own = dict(self.named_parameters())
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        mismatched = {}
        for name, p in own.items():
            if name in state:
                shape = tuple(np.shape(state[name].data if isinstance(state[name], Tensor) else state[name]))
                if shape != p.shape:
                    mismatched[name] = (p.shape, shape)
        if mismatched or (strict and (missing or unexpected)):
            problems = []
            if not strict:
                missing, unexpected = [], []  # tolerated; only the shapes are an error
            if missing:
                problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            if mismatched:
                problems.append(f"shape mismatches ({len(mismatched)}): " + ", ".join(
                    f"{name} expects {want} but got {got}" for name, (want, got) in mismatched.items()))
            raise StateDictError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems),
                                 missing, unexpected, mismatched)
        for name, p in own.items():
            if name in state:
                value = state[name].data if isinstance(state[name], Tensor) else state[name]
                p.data = p.xp.array(to_device(value, p.device), dtype=p.dtype, copy=True)
        return IncompatibleKeys(missing, unexpected)

    # ----- display -----
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = []
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(lines) + "\n)" if lines else ")")


@contextmanager
def swap_parameters(module: Module, tensors: dict):
    """Temporarily replace named parameters by the given Tensors (any leaf, not only Parameters),
    e.g. to gradcheck a module with respect to its weights; the originals come back on exit."""
    saved = []
    try:
        for name, t in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf not in owner._parameters:
                raise KeyError(f"{name!r} is not a parameter of {type(module).__name__}")
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = t
        yield module
    finally:
        for owner, leaf, original in reversed(saved):
            owner._parameters[leaf] = original


class _ModuleSequence(Module):
    """What Sequential and ModuleList share: length, iteration, ``append`` under the next index."""

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module: Module):
        setattr(self, str(len(self)), module)
        return self


class Sequential(_ModuleSequence):
    """Modules applied in order; registered as '0', '1', ... (or by the names of an OrderedDict)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                setattr(self, name, m)
        else:
            for i, m in enumerate(modules):
                setattr(self, str(i), m)

    def __getitem__(self, index):
        items = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*items[index])
        return items[index]

    def forward(self, x):
        # x: whatever the first module takes -> whatever the last one gives
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(_ModuleSequence):
    """A list of Modules registered as '0', '1', ... (``encoder.layer.3.…``)."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    def _key(self, index: int) -> str:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"ModuleList index {index} out of range for length {n}")
        return str(index % n)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index])
        return self._modules[self._key(index)]

    def __setitem__(self, index: int, module: Module):
        setattr(self, self._key(index), module)

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleList has no forward(); iterate over it")
