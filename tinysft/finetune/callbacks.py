"""Early stopping, a dependency-free progress bar and a JSON-lines metrics log.

EarlyStopping is saved into and restored from a checkpoint (``state_dict``); on
resume the MetricsLog is cut back to the checkpoint's step (``truncate``).
"""
import json
import math
import os
import sys
import time

from .weights import get_weights, set_weights

__all__ = ["EarlyStopping", "ProgressBar", "MetricsLog"]


class EarlyStopping:
    """Stop when ``metric`` has not improved for ``patience`` evaluations in a row.

    ``mode`` "min" (default for names containing "loss") or "max" (otherwise).
    An evaluation improves when it beats the best so far by more than
    ``min_delta`` (``value < best − min_delta`` for "min"); NaN never improves.
    The weights after the best evaluation are kept in memory and, with
    ``restore_best``, written back when training ends (stopped early or not).

    >>> es = EarlyStopping(patience=2, metric="loss")
    >>> [es.update({"loss": v}, epoch=e) for e, v in enumerate([1.0, 0.8, 0.85, 0.9])]
    [False, False, False, True]
    >>> es.best_epoch, es.best
    (1, 0.8)
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0, metric: str = "loss", mode: str | None = None,
                 restore_best: bool = True):
        if patience < 1 or min_delta < 0:
            raise ValueError(f"need patience >= 1 and min_delta >= 0, got {patience} and {min_delta}")
        mode = mode or ("min" if "loss" in metric else "max")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.min_delta, self.metric, self.mode = patience, min_delta, metric, mode
        self.restore_best = restore_best
        self.best, self.best_epoch, self.bad_epochs, self.best_weights = None, None, 0, None
        self.stopped = False

    def improves(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict, epoch: int, model=None) -> bool:
        """Record one evaluation; True when training should stop now."""
        if self.metric not in metrics:
            raise KeyError(f"early stopping watches {self.metric!r}, but the evaluation gave {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            if model is not None and self.restore_best:
                self.best_weights = get_weights(model)
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return self.stopped

    def restore(self, model) -> bool:
        """Write the best weights back into ``model``; False if there are none to restore."""
        if not self.restore_best or self.best_weights is None:
            return False
        set_weights(model, self.best_weights)
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped, "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.stopped = int(state["bad_epochs"]), bool(state["stopped"])
        self.best_weights = state["best_weights"]


class ProgressBar:
    """``step 12/100 [=====>      ] 12% loss 0.4321 lr 2.0e-05 3.1 it/s`` rewritten in place on stderr.

    ``enabled=None`` shows it only when the stream is a terminal; it never
    writes anything when disabled. Redraws at most every ``min_interval`` s.
    """

    def __init__(self, total: int | None, enabled: bool | None = None, stream=None, width: int = 24,
                 min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = (hasattr(self.stream, "isatty") and self.stream.isatty()) if enabled is None else enabled
        self.total, self.width, self.min_interval = total, width, min_interval
        self.start, self.last_draw, self.drawn = time.monotonic(), 0.0, False

    def update(self, n: int, **info) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_draw < self.min_interval and n != self.total:
            return
        self.last_draw, self.drawn = now, True
        rate = n / max(now - self.start, 1e-9)
        text = f"step {n}" + (f"/{self.total}" if self.total else "")
        if self.total:
            done = min(1.0, n / self.total)
            filled = int(done * self.width)
            arrow = ">" if filled < self.width else ""
            text += f" [{'=' * filled}{arrow}{' ' * (self.width - filled - len(arrow))}] {done:4.0%}"
        for key, value in info.items():
            text += f" {key} {value:.4g}" if isinstance(value, float) else f" {key} {value}"
        self.stream.write(f"\r{text} {rate:.1f} it/s\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """One JSON object per line, appended and flushed as it is written.

    ``truncate(step)`` keeps only what was logged up to a checkpoint taken
    right after optimizer step ``step``: "train" records up to that step and
    other records (evaluations) before it. A resumed run then rewrites what
    the interrupted one logged after its checkpoint. ``clear()`` empties the
    log for a run that starts afresh. Both replace the file atomically, and
    both (and ``read``) pass over a last line cut short by a crash mid-write.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list:
        """The records, in order; ValueError naming the file and line for a spoilt line other than the last."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):  # no newline after it: a write cut short
                    break
                raise ValueError(f"{self.path}: line {number} is not a JSON record") from None
        return records

    def truncate(self, step: int) -> None:
        kept = [r for r in self.read()
                if r.get("step", 0) < step or (r.get("step", 0) == step and r.get("event") == "train")]
        self._replace("".join(json.dumps(r) + "\n" for r in kept))

    def clear(self) -> None:
        self._replace("")

    def _replace(self, text: str) -> None:
        from ..io.atomic import atomic_write_text
        atomic_write_text(self.path, text)
