"""What the ``tinysft`` commands do: finetune, eval, predict, embed.

A run folder holds everything needed to use or reproduce a run:

    config.toml           the resolved settings (``tinysft finetune --config`` reads it back)
    run.json              model folder, label names, split sizes, test metrics
    metrics.jsonl         one line per logged step and per evaluation
    model.safetensors     the best weights (HF names plus ``head.*``)
    checkpoint/           the resumable training state, when checkpoint_every > 0
    *.png                 loss/accuracy, learning rate per layer group, update/weight ratio
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import rng
from .config import RunConfig, build_config
from .data import (
    DataLoader,
    TextClassificationDataset,
    WordPieceTokenizer,
    load_csv,
    load_jsonl,
    load_wordnet_supersenses,
    split_dataset,
    stratified_sample,
)
from .finetune import EarlyStopping, Trainer, prepare
from .finetune.metrics import classification_metrics
from .functional import cross_entropy
from .io import atomic_write_text, load_file, save_file
from .models import BertForSequenceClassification, BertModel, locate_model
from .optim import optimizer_by_name, schedule_by_name
from .tensor import no_grad, tensor


def _say(message: str) -> None:
    print(message, flush=True)


# ----- data -----
def load_dataset(config: RunConfig) -> TextClassificationDataset:
    """The configured dataset: WordNet supersenses, or a CSV / JSONL file with text and label."""
    if config.data == "wordnet":
        return load_wordnet_supersenses(max_examples=config.max_examples or None, seed=config.seed)
    path = Path(config.data)
    loaders = {".csv": load_csv, ".jsonl": load_jsonl, ".json": load_jsonl}
    if path.suffix.lower() not in loaders:
        raise ValueError(f"data {config.data!r}: expected 'wordnet' or a .csv / .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    dataset = loaders[path.suffix.lower()](path)
    if config.max_examples and len(dataset) > config.max_examples:
        dataset = dataset.subset(stratified_sample(dataset.labels, config.max_examples, seed=config.seed))
    return dataset


def split(config: RunConfig, dataset):
    """Deterministic stratified (train, validation, test) split by the run's seed."""
    train_share = 1.0 - config.val_fraction - config.test_fraction
    return split_dataset(dataset, (train_share, config.val_fraction, config.test_fraction), seed=config.seed)


def tokenizing_collate(tokenizer, max_length: int):
    """(text, label) items → {"input_ids", "attention_mask", "labels"}, padded to the batch's longest."""
    def collate(items):
        texts = [text for text, _ in items]
        encoded = tokenizer.encode_batch(texts, max_length=max_length, padding=True, truncation=True)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": np.array([label for _, label in items], dtype=np.int64)}
    return collate


# ----- model and optimizer -----
def build_optimizer(config: RunConfig, param_groups):
    hyper = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    return optimizer_by_name(config.optimizer, param_groups, lr=config.lr, **hyper)


def build_schedule(config: RunConfig):
    """A factory ``(optimizer, total_steps) -> LRSchedule`` for the Trainer."""
    return lambda optimizer, total_steps: schedule_by_name(config.schedule, optimizer, total_steps,
                                                           config.warmup_ratio)


def _strategy_options(config: RunConfig, train_loader) -> dict:
    if config.strategy == "layerwise":
        return {"decay": config.decay, "gradual_unfreeze": config.gradual_unfreeze}
    if config.strategy == "discriminative":
        return {"fisher_loader": train_loader, "fisher_batches": 8}
    return {}


def _apply_head_lr_and_penalty(config: RunConfig, param_groups) -> None:
    """A group of the new head (named "head…") learns at ``head_lr``; every group gets the penalty.

    Strategies that put the head in a shared group ("full": "all", "encoder_only":
    "encoder+head") train it at ``lr`` like everything else in that group.
    """
    for group in param_groups:
        if group["name"].split(".")[0] == "head":
            group["lr"] = config.head_lr
        if config.penalty != "none":
            group["penalty"], group["penalty_lambda"] = config.penalty, config.penalty_lambda


# ----- the main job -----
def finetune(config: RunConfig) -> int:
    """Fine-tune, evaluate on the test split, write the run folder; prints test metrics."""
    started = time.perf_counter()
    out = Path(config.out)
    rng.manual_seed(config.seed)

    model_dir = locate_model(None if config.model == "auto" else config.model)
    tokenizer = WordPieceTokenizer.from_dir(model_dir)
    dataset = load_dataset(config)
    train, val, test = split(config, dataset)
    _say(f"data: {config.data} — {dataset.num_classes} classes; train {len(train)}, validation {len(val)}, "
         f"test {len(test)}")

    collate = tokenizing_collate(tokenizer, config.max_length)
    micro_batch = config.batch_size // config.accumulation
    train_loader = DataLoader(train, micro_batch, shuffle=True, seed=config.seed, collate=collate)
    val_loader = DataLoader(val, 64, shuffle=False, collate=collate)
    test_loader = DataLoader(test, 64, shuffle=False, collate=collate)

    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=dataset.num_classes,
                                                          pooling=config.pooling, dropout=config.dropout)
    model.to(config.device)
    _say(f"model: {model_dir} — {model.num_parameters():,} parameters; strategy {config.strategy}, "
         f"optimizer {config.optimizer}, device {config.device}")

    plan = prepare(model, config.strategy, config.lr, weight_decay=config.weight_decay,
                   no_decay=("bias", "LayerNorm.weight"), **_strategy_options(config, train_loader))
    if config.strategy == "feature_extraction":
        train_loader = plan.features(train_loader, shuffle=True, seed=config.seed)
        val_loader = plan.features(val_loader)
        test_loader = plan.features(test_loader)
    _apply_head_lr_and_penalty(config, plan.param_groups)
    optimizer = build_optimizer(config, plan.param_groups)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no folder behind

    trainer = Trainer(
        plan.model, optimizer, train_loader, eval_loader=val_loader,
        epochs=config.epochs, max_steps=config.max_steps or None,
        accumulation_steps=config.accumulation, max_grad_norm=config.clip or None,
        schedule=build_schedule(config), num_classes=dataset.num_classes,
        early_stopping=EarlyStopping(config.patience, config.min_delta, metric="accuracy") if config.patience else None,
        on_epoch_start=plan.on_epoch_start, layer_of=plan.layer_of(), callbacks=[_EpochPrinter()],
        log_path=out / "metrics.jsonl", log_every=5, progress=config.progress and sys.stderr.isatty(),
        checkpoint_dir=out / "checkpoint" if config.checkpoint_every else None,
        checkpoint_every=config.checkpoint_every or None)
    trainer.fit()
    train_seconds = time.perf_counter() - started

    test_metrics = trainer.evaluate(test_loader)
    _say("test: " + _format_metrics(test_metrics))
    save_file({name: p.numpy() for name, p in model.named_parameters()}, out / "model.safetensors")
    atomic_write_text(out / "config.toml", _to_toml(config.to_dict()))
    atomic_write_text(out / "run.json", json.dumps({
        "model_dir": str(model_dir), "label_names": list(dataset.label_names),
        "num_labels": dataset.num_classes, "sizes": {"train": len(train), "validation": len(val), "test": len(test)},
        "steps": trainer.step, "seconds": round(train_seconds, 1), "test": test_metrics,
        "examples_per_second": round(trainer.step * config.batch_size / train_seconds, 2),
    }, indent=2) + "\n")
    from .plots import plot_run
    written = plot_run(out)
    _say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s"
         + (f"; plots: {', '.join(p.name for p in written)})" if written else "; install matplotlib for plots)"))
    return 0


class _EpochPrinter:
    """Prints the validation metrics after each epoch."""

    def on_epoch_end(self, trainer, metrics):
        _say(f"epoch {trainer.epoch}: validation " + _format_metrics(metrics))


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _to_toml(settings: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in settings.items())


# ----- using a finished run -----
def load_run(run_dir):
    """(config, run info, model with the run's best weights, tokenizer) from a run folder."""
    run_dir = Path(run_dir)
    for name in ("config.toml", "run.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {name} is missing "
                                    "(make one with 'tinysft finetune --out DIR')")
    config = build_config(run_dir / "config.toml")
    info = json.loads((run_dir / "run.json").read_text())
    backbone = BertModel.from_pretrained(info["model_dir"])
    model = BertForSequenceClassification(backbone, info["num_labels"], pooling=config.pooling,
                                          dropout=config.dropout)
    model.load_state_dict(load_file(run_dir / "model.safetensors", mmap=False))
    model.to(config.device)
    return config, info, model.eval(), WordPieceTokenizer.from_dir(info["model_dir"])


def evaluate(run_dir) -> int:
    """Re-evaluate a run's best weights on its (re-created, identical) test split."""
    config, info, model, tokenizer = load_run(run_dir)
    _, _, test = split(config, load_dataset(config))
    labels, logits = [], []
    collate = tokenizing_collate(tokenizer, config.max_length)
    with no_grad():
        for batch in DataLoader(test, 64, shuffle=False, collate=collate):
            logits.append(model(batch["input_ids"], batch["attention_mask"]).numpy())
            labels.append(batch["labels"])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    metrics = {"loss": cross_entropy(tensor(logits), labels).item(),
               **classification_metrics(logits, labels, info["num_labels"])}
    _say(f"test ({len(test)} examples): " + _format_metrics(metrics))
    return 0


def predict(run_dir, texts) -> int:
    """Print the predicted label and its probability for each text."""
    config, info, model, tokenizer = load_run(run_dir)
    encoded = tokenizer.encode_batch(list(texts), max_length=config.max_length, padding=True, truncation=True)
    with no_grad():
        probs = model(encoded["input_ids"], encoded["attention_mask"]).softmax(-1).numpy()
    for text, row in zip(texts, probs):
        best = int(row.argmax())
        _say(f"{info['label_names'][best]}\t{row[best]:.3f}\t{text}")
    return 0


def embed(texts, model_name="auto", as_json=False) -> int:
    """Print L2-normalised mean-pooled sentence embeddings (cosine similarities for several texts)."""
    model_dir = locate_model(None if model_name == "auto" else model_name)
    vectors = BertModel.from_pretrained(model_dir).encode(list(texts), WordPieceTokenizer.from_dir(model_dir))
    if as_json:
        _say(json.dumps([[round(float(v), 6) for v in row] for row in vectors]))
        return 0
    for text, row in zip(texts, vectors):
        _say(f"{text!r}: dim {row.size}, [{', '.join(f'{v:.4f}' for v in row[:4])}, ...]")
    if len(texts) > 1:
        _say("cosine similarities:\n" + np.array2string(vectors @ vectors.T, precision=3))
    return 0
