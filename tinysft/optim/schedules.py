"""Learning-rate schedules: each group's ``lr`` = its ``initial_lr`` · factor(t).

Because every group is scaled by the same factor, per-layer (discriminative)
rates keep their ratios. A group's ``initial_lr`` is its ``lr`` when the first
schedule sees it; it is stored in the group, so it travels with the optimizer's
``state_dict``. Building a schedule applies factor(0); call ``step()`` after
each ``optimizer.step()``. Warmup follows the Hugging Face schedules (the
factor is 0 at t = 0).

    sched = LinearSchedule(opt, warmup_steps=100, total_steps=1000)
    for batch in loader:
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
"""
import math


class LRSchedule:
    """Base class; subclasses define ``factor(t)`` for the step count t = 0, 1, 2, ..."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.last_step = -1
        self.step()

    def factor(self, t: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and write every group's ``lr``."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        """The ``lr`` of each group, as last set."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume at the saved step (and write the learning rates of that step)."""
        self.last_step = int(state_dict["last_step"])
        self._apply()

    def _apply(self):
        f = self.factor(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * f


def _warmup(t, warmup_steps):
    return t / max(1, warmup_steps)


def _check(warmup_steps, total_steps):
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")


class ConstantSchedule(LRSchedule):
    """factor(t) = t/W for t < W (warmup), else 1."""

    def __init__(self, optimizer, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def factor(self, t):
        return _warmup(t, self.warmup_steps) if t < self.warmup_steps else 1.0


class LinearSchedule(LRSchedule):
    """factor(t) = t/W for t < W, else max(0, (T − t)/(T − W)): warmup, then linear decay to 0 at T."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int):
        _check(warmup_steps, total_steps)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer)

    def factor(self, t):
        W, T = self.warmup_steps, self.total_steps
        return _warmup(t, W) if t < W else max(0.0, (T - t) / (T - W))


class CosineSchedule(LRSchedule):
    """factor(t) = t/W for t < W, else r + (1 − r)·½(1 + cos πp), p = min(1, (t − W)/(T − W)).

    r = ``min_ratio``: the factor falls from 1 to r at step T and stays there.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        _check(warmup_steps, total_steps)
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer)

    def factor(self, t):
        W, T, r = self.warmup_steps, self.total_steps, self.min_ratio
        if t < W:
            return _warmup(t, W)
        p = min(1.0, (t - W) / (T - W))
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


class SlantedTriangular(LRSchedule):
    """Slanted triangular rates (Howard & Ruder 2018, ULMFiT), for T = ``total_steps``::

        cut = ⌊T · cut_frac⌋
        p   = t/cut                                    if t < cut
              1 − (t − cut)/(cut · (1/cut_frac − 1))   otherwise (clamped at 0)
        factor(t) = (1 + p · (ratio − 1)) / ratio

    so the rate climbs from lr/ratio to lr in ``cut`` steps, then falls back to lr/ratio.
    """

    def __init__(self, optimizer, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0):
        if not 0 < cut_frac < 1 or ratio < 1:
            raise ValueError(f"need 0 < cut_frac < 1 and ratio >= 1, got {cut_frac} and {ratio}")
        self.cut = math.floor(total_steps * cut_frac)
        if self.cut < 1:
            raise ValueError(f"total_steps * cut_frac must be >= 1, got {total_steps} * {cut_frac}")
        self.total_steps, self.cut_frac, self.ratio = total_steps, cut_frac, ratio
        super().__init__(optimizer)

    def factor(self, t):
        cut = self.cut
        p = t / cut if t < cut else max(0.0, 1 - (t - cut) / (cut * (1 / self.cut_frac - 1)))
        return (1 + p * (self.ratio - 1)) / self.ratio


SCHEDULES = ("linear", "cosine", "constant", "slanted_triangular")


def schedule_by_name(name: str, optimizer, total_steps: int, warmup_ratio: float = 0.0) -> LRSchedule:
    """The schedule called ``name`` (see ``SCHEDULES``) over ``total_steps``, the first
    ``int(warmup_ratio · total_steps)`` of them warming up (slanted_triangular has its own ramp)."""
    warmup = int(warmup_ratio * total_steps)
    if name == "linear":
        return LinearSchedule(optimizer, warmup, total_steps)
    if name == "cosine":
        return CosineSchedule(optimizer, warmup, total_steps)
    if name == "constant":
        return ConstantSchedule(optimizer, warmup)
    if name == "slanted_triangular":
        return SlantedTriangular(optimizer, total_steps)
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
