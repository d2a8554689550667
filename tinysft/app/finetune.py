"""``tinysft finetune``: check the settings and the folder, load the data and the model, build the plan,
train, test, write the run folder (see ``run_folder`` for what a crash leaves and how a run resumes).

Under ``mpirun -n W tinysft finetune ...`` the W ranks train one run data-parallel
(``tinysft.distributed``): rank 0's settings are every rank's, ``batch_size`` is the
global batch (each rank takes batch_size / (accumulation·W) examples per micro-batch of
every split), and rank 0 alone prints and writes the run folder, so the folder and its
metrics are those of one run.
"""
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from .. import distributed as dist
from .. import rng
from ..data import DataLoader, load_dataset, tokenizing_collate, train_val_test
from ..finetune import EarlyStopping, NonFiniteLossError, Trainer, prepare
from ..models import BertForSequenceClassification, locate_model
from ..nn.transformer import dropout_schedule
from ..optim import NO_DECAY, optimizer_by_name, schedule_by_name
from .config import ConfigError, RunConfig
from .files import read_model_config, read_tokenizer
from .output import format_metrics, say
from .plots import plot_run
from .run_folder import CHECKPOINT, FINISHED, FRESH, METRICS, RESUME, begin_run, clear, start, write_run


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says at which step and what to try."""


def finetune(config: RunConfig, resume: bool = False, overwrite: bool = False) -> int:
    """Fine-tune, evaluate on the test split, write the run folder; prints test metrics.

    Everything that can be refused (the folder, the model's files, the data, the splits)
    is checked before the run folder is touched.
    """
    return on_every_rank(config, lambda settings: _finetune(settings, resume, overwrite))


def on_every_rank(config, body) -> int:
    """``body(config)`` on every data-parallel rank (one process without MPI): rank 0's settings
    broadcast to all, checked against the world size, a failure on one rank ending all of them,
    and only rank 0 printing."""
    dist.init()
    with dist.failing_fast():
        config = dist.broadcast_settings(config)
        check_world(config, dist.world_size())
        with contextlib.nullcontext() if dist.is_main() else contextlib.redirect_stdout(None):  # one voice
            return body(config)


def check_world(config, world: int) -> None:
    """ConfigError unless ``config`` can train on ``world`` data-parallel ranks."""
    if world > 1 and config.batch_size % (config.accumulation * world):
        raise ConfigError(f"batch_size = {config.batch_size}: allowed: a multiple of accumulation × ranks = "
                          f"{config.accumulation} × {world} (each rank takes an equal part of every batch)")
    if world > 1 and config.strategy in ("discriminative", "feature_extraction"):
        raise ConfigError(f"strategy = {config.strategy!r}: allowed with {world} ranks: the strategies other than "
                          "discriminative and feature_extraction (their one pass over the data is not sharded)")


def _finetune(config: RunConfig, resume: bool, overwrite: bool) -> int:
    started = time.perf_counter()
    out = Path(config.out)
    how = dist.broadcast(start(out, config, resume, overwrite) if dist.is_main() else None, "the run folder's state")
    if how == FINISHED:
        say(f"run folder: {out} holds a finished run (run.json): nothing to resume (--overwrite trains it again)")
        return 0
    rng.manual_seed(training_seed(config))

    model_dir = locate_model(None if config.model == "auto" else config.model)
    model_config = read_model_config(model_dir)
    positions = model_config.max_position_embeddings
    if config.max_length > positions:
        raise ConfigError(f"max_length = {config.max_length}: allowed: at most {positions} for {model_dir} "
                          "(max_position_embeddings in its config.json)")
    layer_dropout = layer_dropout_rates(config, model_config.num_hidden_layers, model_dir)
    tokenizer = read_tokenizer(model_dir)
    dataset, (train, val, test) = load_splits(config)
    if dataset.num_classes < 2:
        raise ConfigError(f"data {config.data} has the single label {dataset.label_names[0]!r}: "
                          "a classifier needs at least two")
    say(f"data: {config.data} — {dataset.num_classes} classes; train {len(train)}, validation {len(val)}, "
        f"test {len(test)}")
    train_loader, val_loader, test_loader = build_loaders(config, tokenizer, train, val, test)

    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=dataset.num_classes,
                                                          pooling=config.pooling, dropout=config.dropout)
    if layer_dropout is not None:
        model.bert.encoder.set_dropout(layer_dropout)
    model.to(config.device)
    say(f"model: {model_dir} — {model.num_parameters():,} parameters; strategy {config.strategy}, "
        f"optimizer {config.optimizer}, device {config.device}")

    plan = prepare(model, config.strategy, config.lr, weight_decay=config.weight_decay, no_decay=NO_DECAY,
                   **strategy_options(config, train_loader))
    if config.strategy == "feature_extraction":
        train_loader = plan.features(train_loader, shuffle=True, seed=training_seed(config))
        val_loader = plan.features(val_loader)
        test_loader = plan.features(test_loader)
    apply_head_lr_and_penalty(config, plan.param_groups)
    optimizer = build_optimizer(config, plan.param_groups)
    if dist.is_main():
        if how == FRESH:
            clear(out)  # only now: a run that cannot start leaves the folder as it was
        begin_run(out, config)
    dist.barrier("the run folder's creation")

    trainer = build_trainer(config, plan, optimizer, train_loader, val_loader, dataset.num_classes, out,
                            resume=how == RESUME)
    try:
        with np.errstate(all="ignore"):  # the Trainer itself stops at the first non-finite loss or gradient
            trainer.fit()
    except NonFiniteLossError as error:
        raise TrainingError(f"training stopped at step {error.step} (epoch {error.epoch}): the {error.what} became "
                            f"{error.value}, so that step was not applied; try a lower --lr / --head-lr, --clip 1.0 "
                            f"or look for bad examples in {config.data}, then rerun with --overwrite") \
            from None
    train_seconds = time.perf_counter() - started

    test_metrics = trainer.evaluate(test_loader)
    say("test: " + format_metrics(test_metrics))
    if not dist.is_main():
        return 0
    write_run(out, config, model, {
        "model_dir": str(model_dir), "label_names": list(dataset.label_names),
        "num_labels": dataset.num_classes, "sizes": {"train": len(train), "validation": len(val), "test": len(test)},
        "steps": trainer.step, "seconds": round(train_seconds, 1), "test": test_metrics,
        "examples_per_second": round(trainer.step * config.batch_size / train_seconds, 2),
        "dropout_per_layer": model.bert.encoder.dropout_rates(),
    })
    written = plot_run(out)
    say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s"
        + (f"; plots: {', '.join(p.name for p in written)})" if written else "; install matplotlib for plots)"))
    return 0


def load_splits(config: RunConfig, label_names=None):
    """(dataset, (train, validation, test)) as the config draws them; ConfigError if a split is empty."""
    dataset = load_dataset(config.data, config.max_examples, config.seed, label_names)
    parts = train_val_test(dataset, config.val_fraction, config.test_fraction, config.seed)
    for name, part in zip(("training", "validation", "test"), parts):
        if not len(part):
            raise ConfigError(f"data {config.data}: the {name} split is empty ({len(dataset)} examples, "
                              f"val_fraction {config.val_fraction:g}, test_fraction {config.test_fraction:g}): "
                              "use more examples or other fractions")
    return dataset, parts


def layer_dropout_rates(config: RunConfig, num_layers: int, model_dir):
    """The encoder layers' dropout rates of ``dropout_schedule`` (None: the model's own); ConfigError if
    the schedule does not fit the model's ``num_layers``."""
    try:
        return dropout_schedule(config.dropout_schedule, num_layers)
    except ValueError as error:
        raise ConfigError(f"dropout_schedule = {config.dropout_schedule!r}: {error} ({model_dir} has "
                          f"{num_layers} layers)") from None


def training_seed(config: RunConfig) -> int:
    """The seed of the head's initialisation, dropout and shuffling: ``train_seed``, or ``seed`` when it is -1."""
    return config.seed if config.train_seed < 0 else config.train_seed


def build_loaders(config: RunConfig, tokenizer, train, val, test):
    """Shuffled micro-batches of the training split; the other two in order, 64 at a time."""
    collate = tokenizing_collate(tokenizer, config.max_length)
    world, rank = dist.world_size(), dist.rank()
    micro_batch = config.batch_size // (config.accumulation * world)
    return (DataLoader(train, micro_batch, shuffle=True, seed=training_seed(config), collate=collate,
                       num_replicas=world, rank=rank),
            DataLoader(val, 64 // world or 1, shuffle=False, collate=collate, num_replicas=world, rank=rank),
            DataLoader(test, 64 // world or 1, shuffle=False, collate=collate, num_replicas=world, rank=rank))


def strategy_options(config: RunConfig, train_loader) -> dict:
    """The options of ``prepare`` that the chosen strategy takes from the config."""
    if config.strategy == "layerwise":
        return {"decay": config.decay, "gradual_unfreeze": config.gradual_unfreeze}
    if config.strategy == "discriminative":
        return {"fisher_loader": train_loader, "fisher_batches": 8}
    return {}


def apply_head_lr_and_penalty(config: RunConfig, param_groups) -> None:
    """A group of the new head (named "head…") learns at ``head_lr``; every group gets the penalty.

    Strategies that put the head in a shared group ("full": "all", "encoder_only":
    "encoder+head") train it at ``lr`` like everything else in that group.
    """
    for group in param_groups:
        if group["name"].split(".")[0] == "head":
            group["lr"] = config.head_lr
        if config.penalty != "none":
            group["penalty"], group["penalty_lambda"] = config.penalty, config.penalty_lambda


def build_optimizer(config: RunConfig, param_groups):
    hyper = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    return optimizer_by_name(config.optimizer, param_groups, lr=config.lr, **hyper)


def build_trainer(config: RunConfig, plan, optimizer, train_loader, val_loader, num_classes: int, out: Path,
                  resume: bool = False, loss_fn=None):
    """The Trainer with the config's schedule, clipping, early stopping, logging and checkpoints;
    ``loss_fn`` replaces cross-entropy (``tinysft distill`` passes the distillation loss)."""
    def schedule(opt, total_steps):
        return schedule_by_name(config.schedule, opt, total_steps, config.warmup_ratio)

    stopping = EarlyStopping(config.patience, config.min_delta, metric="accuracy") if config.patience else None
    return Trainer(
        plan.model, optimizer, train_loader, eval_loader=val_loader,
        epochs=config.epochs, max_steps=config.max_steps or None,
        accumulation_steps=config.accumulation, max_grad_norm=config.clip or None,
        schedule=schedule, num_classes=num_classes, early_stopping=stopping,
        on_epoch_start=plan.on_epoch_start, layer_of=plan.layer_of(), callbacks=[EpochPrinter()],
        log_path=out / METRICS, log_every=config.log_every, progress=config.progress and sys.stderr.isatty(),
        checkpoint_dir=out / CHECKPOINT if config.checkpoint_every else None,
        checkpoint_every=config.checkpoint_every or None, resume=resume, loss_fn=loss_fn)


class EpochPrinter:
    """Prints the validation metrics after each epoch."""

    def on_epoch_end(self, trainer, metrics):
        say(f"epoch {trainer.epoch}: validation " + format_metrics(metrics))
