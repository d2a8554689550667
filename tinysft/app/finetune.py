"""``tinysft finetune``: load the data, build the model and the plan, train, test, write the run folder."""
import sys
import time
from pathlib import Path

from .. import rng
from ..data import DataLoader, WordPieceTokenizer, load_dataset, tokenizing_collate, train_val_test
from ..finetune import EarlyStopping, Trainer, prepare
from ..models import BertForSequenceClassification, locate_model
from ..optim import NO_DECAY, optimizer_by_name, schedule_by_name
from .config import RunConfig
from .output import format_metrics, say
from .plots import plot_run
from .run_folder import CHECKPOINT, METRICS, write_run


def finetune(config: RunConfig) -> int:
    """Fine-tune, evaluate on the test split, write the run folder; prints test metrics."""
    started = time.perf_counter()
    out = Path(config.out)
    rng.manual_seed(config.seed)

    model_dir = locate_model(None if config.model == "auto" else config.model)
    tokenizer = WordPieceTokenizer.from_dir(model_dir)
    dataset = load_dataset(config.data, config.max_examples, config.seed)
    train, val, test = train_val_test(dataset, config.val_fraction, config.test_fraction, config.seed)
    say(f"data: {config.data} — {dataset.num_classes} classes; train {len(train)}, validation {len(val)}, "
        f"test {len(test)}")
    train_loader, val_loader, test_loader = build_loaders(config, tokenizer, train, val, test)

    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=dataset.num_classes,
                                                          pooling=config.pooling, dropout=config.dropout)
    model.to(config.device)
    say(f"model: {model_dir} — {model.num_parameters():,} parameters; strategy {config.strategy}, "
        f"optimizer {config.optimizer}, device {config.device}")

    plan = prepare(model, config.strategy, config.lr, weight_decay=config.weight_decay, no_decay=NO_DECAY,
                   **strategy_options(config, train_loader))
    if config.strategy == "feature_extraction":
        train_loader = plan.features(train_loader, shuffle=True, seed=config.seed)
        val_loader = plan.features(val_loader)
        test_loader = plan.features(test_loader)
    apply_head_lr_and_penalty(config, plan.param_groups)
    optimizer = build_optimizer(config, plan.param_groups)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no folder behind

    trainer = build_trainer(config, plan, optimizer, train_loader, val_loader, dataset.num_classes, out)
    trainer.fit()
    train_seconds = time.perf_counter() - started

    test_metrics = trainer.evaluate(test_loader)
    say("test: " + format_metrics(test_metrics))
    write_run(out, config, model, {
        "model_dir": str(model_dir), "label_names": list(dataset.label_names),
        "num_labels": dataset.num_classes, "sizes": {"train": len(train), "validation": len(val), "test": len(test)},
        "steps": trainer.step, "seconds": round(train_seconds, 1), "test": test_metrics,
        "examples_per_second": round(trainer.step * config.batch_size / train_seconds, 2),
    })
    written = plot_run(out)
    say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s"
        + (f"; plots: {', '.join(p.name for p in written)})" if written else "; install matplotlib for plots)"))
    return 0


def build_loaders(config: RunConfig, tokenizer, train, val, test):
    """Shuffled micro-batches of the training split; the other two in order, 64 at a time."""
    collate = tokenizing_collate(tokenizer, config.max_length)
    micro_batch = config.batch_size // config.accumulation
    return (DataLoader(train, micro_batch, shuffle=True, seed=config.seed, collate=collate),
            DataLoader(val, 64, shuffle=False, collate=collate),
            DataLoader(test, 64, shuffle=False, collate=collate))


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


def build_trainer(config: RunConfig, plan, optimizer, train_loader, val_loader, num_classes: int, out: Path):
    """The Trainer with the config's schedule, clipping, early stopping, logging and checkpoints."""
    def schedule(opt, total_steps):
        return schedule_by_name(config.schedule, opt, total_steps, config.warmup_ratio)

    stopping = EarlyStopping(config.patience, config.min_delta, metric="accuracy") if config.patience else None
    return Trainer(
        plan.model, optimizer, train_loader, eval_loader=val_loader,
        epochs=config.epochs, max_steps=config.max_steps or None,
        accumulation_steps=config.accumulation, max_grad_norm=config.clip or None,
        schedule=schedule, num_classes=num_classes, early_stopping=stopping,
        on_epoch_start=plan.on_epoch_start, layer_of=plan.layer_of(), callbacks=[EpochPrinter()],
        log_path=out / METRICS, log_every=5, progress=config.progress and sys.stderr.isatty(),
        checkpoint_dir=out / CHECKPOINT if config.checkpoint_every else None,
        checkpoint_every=config.checkpoint_every or None)


class EpochPrinter:
    """Prints the validation metrics after each epoch."""

    def on_epoch_end(self, trainer, metrics):
        say(f"epoch {trainer.epoch}: validation " + format_metrics(metrics))
