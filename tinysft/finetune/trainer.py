"""The training loop: ``Trainer(model, optimizer, train_loader, ...).fit()``.

One optimizer step (``step`` counts them from 1):

    micro-batches b_1..b_k   (k = accumulation_steps, fewer at the end of an epoch)
    n      = Σ_i count(b_i)            labelled positions (label != ignore_index) in all k
    loss_i = Σ over b_i's positions of the loss, scaled by 1/n, then backward
    loss  += penalty_loss(optimizer)   once per step, if a group has a penalty
    clip_grad_norm_(params, max_grad_norm); optimizer.step(); schedule.step()

Scaling every micro-batch's summed loss by the one count n of the whole step
makes the accumulated gradient that of the mean loss over the k·B examples,
whatever the split: an uneven last micro-batch or ignored labels change n, not
the weighting. With ``accumulation_steps=k`` the run matches batch size k·B
(exactly for a deterministic model; with dropout on, the k micro-batches draw
their masks separately, which is the same distribution, not the same numbers).

Each epoch ends with an evaluation (loss, accuracy, macro-F1, or your own
``evaluate_fn``), early stopping and the ``on_epoch_start`` hook of the next
(gradual unfreezing). A non-finite loss raises ``NonFiniteLossError`` naming the
step. ``log_path`` gets one JSON line per ``log_every`` steps::

    {"event": "train", "step": 12, "epoch": 0, "loss": 0.41, "penalty": 0.0,
     "lr": {"head": 2e-05, "layer.1": 1.8e-05}, "grad_norm": 1.3,
     "update_ratio": {"head": 0.0011, "layer.1": 0.0004}}     # ‖Δθ‖/‖θ‖ per layer

and one ``{"event": "eval", ...}`` line per evaluation. The log describes the one
run the Trainer holds: a Trainer that starts afresh empties it when built, and
resuming cuts it back to the checkpoint's step, so a run killed and resumed any
number of times logs each step once, as an uninterrupted run would.

Checkpoints (``checkpoint_dir`` + ``checkpoint_every`` steps) hold the weights,
the optimizer and schedule state, the RNG state of ``tinysft.rng`` (dropout),
the loaders' positions, the step/epoch counters, the history and the early
stopping state (best weights included). They are written with
``tinysft.io.checkpoint.save_checkpoint`` (temp file + rename, the manifest last),
so a save killed mid-way leaves the previous checkpoint whole. A Trainer built
the same way with ``resume=True`` continues from the checkpoint and, on the
CPU, ends with bit-identical weights to a run that was never interrupted.

Data parallel (``tinysft.distributed``, one Trainer per rank, each on its shard of
every batch): n is the count over all ranks (summed before the first backward), the
gradients are summed over the ranks in one flat buffer after the last backward, so
the norm that clipping measures afterwards is the global one; a non-finite loss on
any rank stops every rank at the same step. The penalty's gradient is added on rank 0
only (it is the same on every rank and the sum would count it W times). Evaluation
sums the loss and gathers the logits of every rank's shard, and an ``evaluate_fn``'s
result is rank 0's, so early stopping decides the same everywhere. Rank 0 alone writes
the log and the checkpoints (the others wait at a barrier), and every rank starts
from rank 0's weights. Each rank draws its dropout masks from its own stream (the
shared seed's next draw and the rank); a checkpoint keeps every rank's, and a resume
on another number of ranks splits rank 0's again.
"""
import math
import os
from itertools import islice

import numpy as np

from .. import distributed as dist
from ..backend import to_device
from ..functional import cross_entropy
from ..optim import clip_grad_norm_, penalty_loss
from ..rng import generator, get_rng_state, manual_seed, set_rng_state
from ..tensor import no_grad
from .batch import count_examples, cross_entropy_sum, forward, labels_of
from .callbacks import MetricsLog, ProgressBar
from .metrics import classification_metrics
from .weights import get_weights, set_weights

__all__ = ["Trainer", "NonFiniteLossError", "fit"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or penalty, or gradient norm) became inf or NaN; ``step`` and ``epoch`` say where."""

    def __init__(self, step: int, epoch: int, value: float, what: str = "loss", micro_batch: int | None = None):
        self.step, self.epoch, self.value, self.what = step, epoch, value, what
        where = f" (micro-batch {micro_batch})" if micro_batch is not None else ""
        super().__init__(f"non-finite {what} {value} at step {step}, epoch {epoch}{where}: lower the learning "
                         "rate, clip gradients (max_grad_norm=1.0) or check the batch for bad inputs")


class Trainer:
    """Fine-tune ``model`` with ``optimizer`` on ``train_loader``; see the module docstring.

    Length: ``epochs`` and/or ``max_steps`` (whichever ends first; 1 epoch if neither).
    ``schedule``: an ``LRSchedule`` or ``f(optimizer, total_steps) -> LRSchedule``.
    ``loss_fn(model, batch) -> loss summed over the batch's labelled positions`` and
    ``count_fn(batch) -> number of those positions`` (default: cross-entropy and
    labels != ignore_index). ``layer_of``: ``{param name: layer}`` for the update
    ratios (default: ``strategies.layer_groups``). ``callbacks``: objects with
    optional ``on_step_end(trainer, record)`` / ``on_epoch_end(trainer, metrics)``.
    """

    def __init__(self, model, optimizer, train_loader, *, eval_loader=None, epochs: int | None = None,
                 max_steps: int | None = None, accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 schedule=None, loss_fn=None, count_fn=None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, evaluate_fn=None, num_classes: int | None = None,
                 early_stopping=None, on_epoch_start=None, callbacks=(), log_path=None, log_every: int = 10,
                 layer_of: dict | None = None, progress: bool | None = None, checkpoint_dir=None,
                 checkpoint_every: int | None = None, resume: bool = True):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        self.model, self.optimizer, self.train_loader, self.eval_loader = model, optimizer, train_loader, eval_loader
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self.ignore_index, self.num_classes = ignore_index, num_classes
        self.loss_fn = loss_fn or (lambda m, b: cross_entropy_sum(m, b, ignore_index, label_smoothing))
        self.count_fn = count_fn or (lambda b: count_examples(b, ignore_index))
        self.evaluate_fn, self.early_stopping = evaluate_fn, early_stopping
        self.on_epoch_start, self.callbacks = on_epoch_start, list(callbacks)
        self.log_every, self.progress = max(1, log_every), progress
        self.checkpoint_dir, self.checkpoint_every, self.resume = checkpoint_dir, checkpoint_every, resume
        self.log = MetricsLog(log_path) if log_path is not None and dist.is_main() else None
        if self.log is not None and not self._resumes():
            self.log.clear()  # a run that starts afresh starts its log afresh

        self.batches_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
        self.steps_per_epoch = (None if self.batches_per_epoch is None
                                else -(-self.batches_per_epoch // accumulation_steps))
        if epochs is None and max_steps is None:
            epochs = 1
        self.epochs, self.max_steps = epochs, max_steps
        lengths = [max_steps] if max_steps is not None else []
        if epochs is not None and self.steps_per_epoch is not None:
            lengths.append(epochs * self.steps_per_epoch)
        self.total_steps = min(lengths) if lengths else None
        if callable(schedule) and not hasattr(schedule, "step"):
            if self.total_steps is None:
                raise ValueError("a schedule factory needs the run's length: give max_steps or a loader with len()")
            schedule = schedule(optimizer, self.total_steps)
        self.schedule = schedule
        if layer_of is None:
            from .strategies import layer_groups
            layer_of = {n: g for g, members in layer_groups(model) for n, _ in members}
        self.layer_of = layer_of
        self._group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]

        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.history, self.last_record = [], None

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list:
        """Train to the end (or early stop); returns the evaluation history."""
        if self._resumes():
            self.load_checkpoint()
        else:
            _split_rng()
        # Rank 0's weights everywhere; read-only ones are maps of the files every rank loaded alike.
        dist.broadcast_arrays([p.data for p in self.model.parameters()
                               if not isinstance(p.data, np.ndarray) or p.data.flags.writeable])
        self._clear_grads()
        bar = ProgressBar(self.total_steps, enabled=self.progress)
        try:
            while True:
                if self.batches_in_epoch == 0 and self._finished():
                    break
                if self.on_epoch_start is not None:
                    self.on_epoch_start(self.epoch)
                self.model.train()
                hit_max_steps = self._run_epoch(bar)
                if self._end_epoch() or hit_max_steps:
                    break
        finally:
            bar.close()
        if self.early_stopping is not None:
            self.early_stopping.restore(self.model)
        return self.history

    def _resumes(self) -> bool:
        """Whether ``fit`` continues from a checkpoint."""
        return bool(self.resume and self.checkpoint_dir is not None
                    and os.path.exists(os.path.join(self.checkpoint_dir, "state.json")))

    def _finished(self) -> bool:
        return ((self.epochs is not None and self.epoch >= self.epochs)
                or (self.max_steps is not None and self.step >= self.max_steps))

    def _run_epoch(self, bar) -> bool:
        """Optimizer steps over the rest of this epoch; True if max_steps was reached."""
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        if self.batches_per_epoch is not None and self.batches_in_epoch >= self.batches_per_epoch:
            return False  # resumed right after the epoch's last step
        batches = iter(self.train_loader)
        if not hasattr(self.train_loader, "load_state_dict"):  # a plain re-iterable: skip what was done
            batches = islice(batches, self.batches_in_epoch, None)
        while True:
            micro = list(islice(batches, self.accumulation_steps))
            if not micro:
                return False
            self.batches_in_epoch += len(micro)
            record = self.train_step(micro)
            bar.update(self.step, loss=record["loss"], lr=next(iter(record["lr"].values()), 0.0))
            if self._logs(self.step):
                self.log.write(record)
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, record)
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save_checkpoint()
            if self.max_steps is not None and self.step >= self.max_steps:
                return True

    def _logs(self, step: int) -> bool:
        """Whether ``step`` goes into the JSONL log: every ``log_every``-th step and the last one."""
        return self.log is not None and (step % self.log_every == 0 or step == self.total_steps)

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over ``micro_batches`` (see the module docstring); returns its record."""
        step = self.step + 1
        total = sum(self.count_fn(b) for b in micro_batches if b is not None)  # None: an empty shard
        if dist.world_size() > 1:
            total = int(dist.all_reduce_sum([total], f"the count of step {step}")[0])
        loss_value, bad = 0.0, None
        for i, batch in enumerate(micro_batches):
            if batch is None:
                continue
            loss = self.loss_fn(self.model, batch)
            value = float(loss.item())
            if not math.isfinite(value):
                if dist.world_size() == 1:
                    self._clear_grads()
                    raise NonFiniteLossError(step, self.epoch, value, "loss", micro_batch=i)
                bad = bad or (i, value)  # the other ranks must hear of it before anyone stops
                continue
            loss_value += value
            if total and loss.requires_grad:
                (loss * (1.0 / total)).backward()
        penalty_value = 0.0
        if any(g.get("penalty") for g in self.optimizer.param_groups):
            penalty = penalty_loss(self.optimizer)
            penalty_value = float(penalty.item())
            if not math.isfinite(penalty_value):
                self._clear_grads()
                raise NonFiniteLossError(step, self.epoch, penalty_value, "penalty")
            if penalty.requires_grad and dist.is_main():
                penalty.backward()
        if dist.world_size() > 1:
            loss_value = self._all_reduce_gradients(step, loss_value, bad)

        # After the all-reduce every rank holds the summed gradients: this norm is the global one.
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm is not None else math.inf)
        if not math.isfinite(grad_norm):
            self._clear_grads()
            raise NonFiniteLossError(step, self.epoch, grad_norm, "gradient norm")
        lrs = {name: g["lr"] for name, g in zip(self._group_names, self.optimizer.param_groups)}
        measure = self._logs(step)
        before = self._snapshot() if measure else None
        self.optimizer.step()
        self._clear_grads()
        if self.schedule is not None:
            self.schedule.step()
        self.step = step

        record = {"event": "train", "step": step, "epoch": self.epoch,
                  "loss": loss_value / total if total else float("nan"), "penalty": penalty_value,
                  "lr": lrs, "grad_norm": grad_norm, "examples": total}
        if before is not None:
            record["update_ratio"] = self._update_ratios(before)
        self.last_record = record
        return record

    def _all_reduce_gradients(self, step: int, loss_value: float, bad) -> float:
        """Sum the loss, the non-finite flags and the gradients over the ranks; returns the summed loss.

        A parameter that got no gradient on any rank keeps ``grad = None`` (as in one
        process); the others are summed in one flat buffer, zeros standing in for a rank
        whose shard did not reach them.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        flags = dist.all_reduce_sum([loss_value, bad is not None] + [p.grad is not None for p in params],
                                    f"the loss of step {step}")
        if flags[1]:
            self._clear_grads()
            value, micro_batch = (bad[1], bad[0]) if bad is not None else (math.nan, None)
            raise NonFiniteLossError(step, self.epoch, value, "loss" if bad else "loss on another rank",
                                     micro_batch=micro_batch)
        reached = [p for p, has in zip(params, flags[2:]) if has]
        for p in reached:
            if p.grad is None:
                p.grad = np.zeros_like(p.data)
        dist.all_reduce([p.grad for p in reached], f"the gradients of step {step}")
        return float(flags[0])

    def _end_epoch(self) -> bool:
        """Evaluate, log, update early stopping; True when it says stop."""
        stop = False
        if self.evaluate_fn is not None or self.eval_loader is not None:
            metrics = self.evaluate()
            record = {"event": "eval", "step": self.step, "epoch": self.epoch, **metrics}
            self.history.append(record)
            if self.log is not None:
                self.log.write(record)
            if self.early_stopping is not None:
                stop = self.early_stopping.update(metrics, self.epoch, self.model)
            for cb in self.callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, metrics)
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return stop

    def evaluate(self, loader=None) -> dict:
        """``{"loss", "accuracy", "macro_f1"}`` on ``loader`` (default: the eval loader), in eval mode."""
        if self.evaluate_fn is not None and loader is None:
            return dict(dist.broadcast(dict(self.evaluate_fn(self.model)), "the evaluation's metrics"))
        loader = loader if loader is not None else self.eval_loader
        was_training = getattr(self.model, "training", True)
        self.model.eval()
        loss_sum, count, all_logits, all_labels = 0.0, 0, [], []
        try:
            with no_grad():
                for batch in loader:
                    if batch is None:  # an empty shard
                        continue
                    logits = forward(self.model, batch)
                    labels = labels_of(batch)
                    loss_sum += float(cross_entropy(logits, labels, ignore_index=self.ignore_index,
                                                    reduction="sum").item())
                    count += int((labels != self.ignore_index).sum())
                    all_logits.append(logits.numpy().reshape(-1, logits.shape[-1]))
                    all_labels.append(labels.reshape(-1))
        finally:
            self.model.train(was_training)
        if getattr(loader, "num_replicas", 1) > 1:  # each rank saw its shard: the sums and logits of all
            loss_sum, count = dist.all_reduce_sum([loss_sum, count], "the evaluation's loss")
            shards = dist.broadcast_each((all_logits, all_labels), "the evaluation's logits")
            all_logits = [a for logits, _ in shards for a in logits]
            all_labels = [a for _, labels in shards for a in labels]
        metrics = classification_metrics(np.concatenate(all_logits), np.concatenate(all_labels),
                                         self.num_classes, self.ignore_index)
        return {"loss": loss_sum / count if count else float("nan"), **metrics}

    # ------------------------------------------------------------------ helpers

    def _clear_grads(self):
        for p in self.model.parameters():
            p.grad = None
        self.optimizer.zero_grad()

    def _snapshot(self) -> dict:
        layers = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                layers.setdefault(self.layer_of.get(name, "other"), []).append((p, p.data.copy()))
        return layers

    @staticmethod
    def _update_ratios(before) -> dict:
        """‖θ_after − θ_before‖ / ‖θ_before‖ per layer (norms over all the layer's tensors)."""
        ratios = {}
        for layer, pairs in before.items():
            delta = math.sqrt(sum(float(((p.data - old).astype(np.float64) ** 2).sum()) for p, old in pairs))
            weight = math.sqrt(sum(float((old.astype(np.float64) ** 2).sum()) for _, old in pairs))
            ratios[layer] = delta / weight if weight else (0.0 if delta == 0 else math.inf)
        return ratios

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything but the weights that a bit-exact resume needs (JSON + NumPy arrays)."""
        opt = self.optimizer.state_dict()
        return {
            "trainer": {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                        "history": self.history},
            "optimizer": _to_cpu({"state": {str(i): s for i, s in opt["state"].items()},
                                  "param_groups": opt["param_groups"]}),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": (get_rng_state() if dist.world_size() == 1
                    else dist.broadcast_each(get_rng_state(), "the ranks' RNG states")),
            "train_loader": _loader_state(self.train_loader),
            "eval_loader": _loader_state(self.eval_loader),
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        t = state["trainer"]
        self.step, self.epoch, self.batches_in_epoch = int(t["step"]), int(t["epoch"]), int(t["batches_in_epoch"])
        self.history = list(t["history"])
        opt = state["optimizer"]
        self.optimizer.load_state_dict({"state": {int(i): s for i, s in opt["state"].items()},
                                        "param_groups": opt["param_groups"]})
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
        if len(states) == dist.world_size():
            set_rng_state(states[dist.rank()])
        else:
            set_rng_state(states[0])
            _split_rng()
        for loader, key in ((self.train_loader, "train_loader"), (self.eval_loader, "eval_loader")):
            if state.get(key) is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(state[key])
        if self.early_stopping is not None and state.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])

    def save_checkpoint(self, directory=None) -> None:
        """Write the weights and ``state_dict()`` atomically into ``directory`` (default: checkpoint_dir)."""
        from ..io.checkpoint import save_checkpoint
        state = self.state_dict()  # on every rank: it gathers their RNG states
        if dist.is_main():  # every rank holds the same weights
            save_checkpoint(directory or self.checkpoint_dir, get_weights(self.model), state)
        dist.barrier(f"the checkpoint of step {self.step}")

    def load_checkpoint(self, directory=None) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` (the log is cut back to its step)."""
        from ..io.checkpoint import load_checkpoint
        tensors, state = load_checkpoint(directory or self.checkpoint_dir)
        set_weights(self.model, tensors)
        self.load_state_dict(state)
        if self.log is not None:
            self.log.truncate(self.step)


def _split_rng() -> None:
    """With several ranks, give each its own stream: the shared generator's next draw and the rank."""
    if dist.world_size() > 1:
        manual_seed([int(generator().integers(2**63)), dist.rank()])


def _loader_state(loader):
    return loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None


def _to_cpu(tree):
    """A copy of a state tree with every backend array as a NumPy array."""
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_to_cpu(v) for v in tree]
    if hasattr(tree, "shape") and hasattr(tree, "dtype") and not isinstance(tree, np.generic):
        return np.array(to_device(tree, "cpu"), copy=True)
    return tree


# ---------------------------------------------------------------------- one call

def fit(model, train_loader, eval_loader=None, *, strategy: str = "full", lr: float = 2e-5,
        optimizer: str = "adamw", weight_decay: float = 0.01, warmup_ratio: float = 0.0,
        schedule: str | None = "linear", strategy_options: dict | None = None, feature_cache_dir=None,
        **trainer_kwargs) -> Trainer:
    """Prepare ``model`` for ``strategy``, build the optimizer and schedule, train; returns the Trainer.

    ``optimizer``: "adamw", "adam" or "sgd"; ``schedule``: "linear", "cosine",
    "constant", "slanted_triangular" or None, with ``warmup_ratio`` of the steps warming up.
    ``strategy_options`` go to ``prepare`` (e.g. ``{"decay": 0.9}``,
    ``{"fisher_loader": loader}``). For feature_extraction the loaders are
    replaced by loaders over cached features (on disk in ``feature_cache_dir``
    if given). Other keyword arguments go to ``Trainer``.
    """
    from .. import optim
    from .strategies import prepare
    plan = prepare(model, strategy, lr, weight_decay=weight_decay, **(strategy_options or {}))
    if strategy == "feature_extraction":
        cache = (lambda name: os.path.join(feature_cache_dir, name)) if feature_cache_dir else (lambda name: None)
        train_loader = plan.features(train_loader, shuffle=True, seed=getattr(train_loader, "seed", 0),
                                     cache=cache("train.safetensors"))
        if eval_loader is not None:
            eval_loader = plan.features(eval_loader, cache=cache("eval.safetensors"))
    opt = optim.optimizer_by_name(optimizer, plan.param_groups, lr=lr)
    factory = None if schedule is None else (
        lambda o, total: optim.schedule_by_name(schedule, o, total, warmup_ratio))
    trainer = Trainer(plan.model, opt, train_loader, eval_loader=eval_loader, schedule=factory,
                      on_epoch_start=plan.on_epoch_start, layer_of=plan.layer_of(), **trainer_kwargs)
    trainer.plan = plan
    trainer.fit()
    return trainer
