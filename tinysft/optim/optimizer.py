"""The ``Optimizer`` base class: parameter groups, per-parameter state, checkpoints.

As in PyTorch, ``param_groups`` is a list of dicts, each holding ``params`` and
its own hyper-parameters (filled from the optimizer's defaults). ``step()``
reads the dicts every time, so learning-rate schedules and per-layer rates are
plain edits to them. Subclasses write one method, ``_update(p, grad, state,
group)``, which hands ``_foreach_piece`` the elementwise update of ``p.data``;
``step()`` then runs all of them over the CPU's cores in one go.

Parameters are duck-typed: anything with ``.data`` (a NumPy or CuPy array),
``.grad`` (an array of the same shape, or ``None``) and ``.xp`` works.
"""
import copy
import threading

from ..backend import device_of, to_device
from .regularization import init_penalty
from .spans import map_spans

CHUNK = 1 << 17
"""Elements per piece in ``Optimizer._run_queued``: a piece of each array (512 KB of float32)
stays in cache through all the passes of an update, which halves an AdamW step on the CPU."""


class ParamState:
    """``optimizer.state``: ``state[p]`` is parameter ``p``'s dict, created on first use.

    Keyed by identity (``id(p)`` maps to ``(p, state)``, which keeps ``p`` alive),
    so it does not depend on how tensors hash or compare.
    """

    def __init__(self):
        self._items = {}

    def __getitem__(self, p):
        if id(p) not in self._items:
            self._items[id(p)] = (p, {})
        return self._items[id(p)][1]

    def __contains__(self, p):
        return id(p) in self._items

    def __len__(self):
        return len(self._items)

    def items(self):
        return [(p, s) for p, s in self._items.values()]

    def clear(self):
        self._items.clear()


class Optimizer:
    """Base class. ``params``: an iterable of tensors, or of dicts (parameter groups)."""

    def __init__(self, params, defaults):
        if hasattr(params, "data"):
            raise TypeError("params should be an iterable of Tensors or of dicts, got a single Tensor")
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = ParamState()
        self._buffers = threading.local()  # each thread's scratch arrays, freed with the thread
        self._queued = []  # (update, flat arrays, work buffers, their dtype's array) for _run_queued
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in sorted(group.items()) if k not in ("params", "penalty_anchor"))
            lines.append(f"  group {i}: {len(group['params'])} params, {hyper}")
        return "\n".join(lines + [")"])

    def add_param_group(self, group: dict) -> None:
        """Add a group; keys it lacks are taken from the defaults.

        Raises ``ValueError`` if a parameter is repeated or already in another group.
        """
        if not isinstance(group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(group).__name__}")
        group = dict(group)
        params = group["params"]
        params = [params] if hasattr(params, "data") else list(params)
        for p in params:
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids):
            raise ValueError("a parameter group contains the same parameter more than once")
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        if taken.intersection(ids):
            raise ValueError("some parameters appear in more than one parameter group")
        group["params"] = params
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        init_penalty(group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient (``grad = None``), or fill it with zeros in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.fill(0)

    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()`` if given."""
        loss = closure() if closure is not None else None
        self._queued = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state[p], group)
        self._run_queued()
        return loss

    def _update(self, p, grad, state, group):
        raise NotImplementedError

    def _foreach_piece(self, update, *arrays, work=2, like=0):
        """Have ``update(*pieces, *buffers)`` run over matching flat pieces of ``arrays``, in place,
        before ``step()`` returns. For ``_update``, which states its math once, on pieces.

        ``None`` entries stay ``None``; ``buffers`` are ``work`` scratch arrays shaped like the
        pieces, of ``arrays[like]``'s dtype. On a GPU (one kernel per op is best there), or when
        any array is not contiguous, ``update`` runs now on the whole arrays; otherwise the call is
        queued for ``_run_queued``.
        """
        present = [a for a in arrays if a is not None]
        if device_of(present[0]) == "cuda" or not all(a.flags.c_contiguous for a in present):
            update(*arrays, *(self._scratch(arrays[like], slot) for slot in range(work)))
        else:
            self._queued.append((update, [None if a is None else a.reshape(-1) for a in arrays], work, like))

    def _run_queued(self):
        """Run the queued CPU updates of this step.

        ``map_spans`` shares their arrays out over the threads (NumPy's ufuncs release the GIL)
        with one wait per step, not one per parameter; each thread runs its part of each array in
        ``CHUNK``-element pieces, so that a piece of every array stays in cache through all the
        passes of an update. Each thread has its own buffers. The updates are elementwise, so
        neither the pieces nor the blocks change a bit of the result.
        """
        queued, self._queued = self._queued, []

        def part(k, lo, hi):  # elements [lo, hi) of the k-th queued update's arrays
            update, flats, work, like = queued[k]
            buffers = [self._scratch(flats[like][:CHUNK], slot) for slot in range(work)]
            for i in range(lo, hi, CHUNK):
                j = min(i + CHUNK, hi)
                update(*(None if f is None else f[i:j] for f in flats), *(b[:j - i] for b in buffers))

        map_spans(part, [flats[0].size for _, flats, _, _ in queued])

    def _scratch(self, like, slot=0):
        """A reusable work array shaped like ``like`` (no fresh allocation per step), one per thread."""
        buffers, key = vars(self._buffers), (like.__class__, like.dtype.str, slot)
        buf = buffers.get(key)
        if buf is None or buf.size < like.size:
            buf = buffers[key] = like.ravel().copy()
        return buf[:like.size].reshape(like.shape)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``.

        Parameters are numbered in group order, as in PyTorch. Everything is a
        copy (arrays stay arrays of the parameter's backend), so the result can
        be kept while training goes on.
        """
        index, groups = {}, []
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index[id(p)] = len(index)
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {index[id(p)]: {k: copy.deepcopy(v) for k, v in s.items()}
                 for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters and state saved by ``state_dict()``.

        The optimizer must have been built over the same parameters, in the
        same groups and order. Arrays are copied onto each parameter's backend
        and, when floating point, cast to its dtype.
        """
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved)} parameter groups, "
                             f"but the optimizer has {len(self.param_groups)}")
        for i, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(f"parameter group {i} has {len(mine['params'])} parameters, "
                                 f"but the loaded state dict has {len(theirs['params'])} in it")
        by_index = {}
        for mine, theirs in zip(self.param_groups, saved):
            by_index.update(zip(theirs["params"], mine["params"]))
        for i in state_dict["state"]:
            if i not in by_index:
                raise ValueError(f"loaded state refers to parameter {i}, which no group contains")
        restored = [(by_index[i], {k: _to_param_backend(v, by_index[i], k) for k, v in s.items()})
                    for i, s in state_dict["state"].items()]
        self.state.clear()
        for p, s in restored:
            self.state[p].update(s)
        for mine, theirs in zip(self.param_groups, saved):
            params = mine["params"]
            mine.clear()
            mine.update({k: copy.deepcopy(v) for k, v in theirs.items() if k != "params"})
            mine["params"] = params
            init_penalty(mine)


def scalar_type(data, grad):
    """What to make an update's scalars with: ``data``'s dtype (NumPy takes ``multiply(a, np.float32(c),
    out=a)`` in about half the time of ``multiply(a, c, out=a)`` with a Python float ``c``), or Python's
    ``float`` when ``grad`` has another dtype, so that each operation rounds ``c`` to its own dtype."""
    return data.dtype.type if grad.dtype == data.dtype else float


def _to_param_backend(value, p, key):
    """A copy of a saved state value, as an array of ``p``'s backend when it was one."""
    if not hasattr(value, "dtype") or not hasattr(value, "shape") or value.shape == ():
        return copy.deepcopy(value)
    if value.shape != p.data.shape:
        raise ValueError(f"state {key!r} has shape {value.shape}, but its parameter has shape {p.data.shape}")
    dtype = p.data.dtype if value.dtype.kind == "f" else value.dtype
    return to_device(value, device_of(p.data)).astype(dtype, copy=True)
