"""``tinysft ensemble RUN_A RUN_B ...`` and ``tinysft finetune --seeds 0,1,2``.

The ensemble of K finished runs on their common test split, two ways (``finetune.ensemble``):

    mean of probabilities:  argmax_c (1/K) Σ_k softmax(z_k(x))_c
    majority vote:          the class most members predict (a tie: the smallest class id)

It prints each member's and each ensemble's accuracy and macro-F1, and the ensembles' gain
over the best member. Runs are refused unless they share their label names (in the same
order) and their test split: the settings that draw it (data, max_examples, seed,
val_fraction, test_fraction) must agree; the message names the first that differs.

``--seeds`` trains one member per seed in ``OUT/seed<s>``, each with ``train_seed = s``
(the head's initialisation, dropout and shuffling) and the one split of ``seed``, then
evaluates their ensemble.
"""
import dataclasses
from pathlib import Path

import numpy as np

from ..data import DataLoader, tokenizing_collate
from ..finetune.ensemble import METHODS, ensemble_metrics, softmax_np
from ..tensor import no_grad
from .config import ConfigError
from .output import say
from .run_folder import INFO, load_run, read_run

SPLIT_SETTINGS = ("data", "max_examples", "seed", "val_fraction", "test_fraction")  # what draws the test split
METHOD_NAMES = {"mean": "mean of probabilities", "vote": "majority vote"}


def split_logits(model, tokenizer, max_length: int, examples, batch_size: int = 64):
    """(logits (N, C) as float64, labels (N,)) of ``model`` over ``examples`` in order, under no_grad."""
    collate = tokenizing_collate(tokenizer, max_length)
    logits, labels = [], []
    with no_grad():
        for batch in DataLoader(examples, batch_size, shuffle=False, collate=collate):
            logits.append(model(batch["input_ids"], batch["attention_mask"]).numpy().astype(np.float64))
            labels.append(batch["labels"])
    return np.concatenate(logits), np.concatenate(labels)


def common_test_split(run_dirs):
    """(label names, test split) that every run in ``run_dirs`` was tested on; ValueError naming the
    run and the difference otherwise."""
    from .finetune import load_splits
    runs = [(Path(d), *read_run(d)) for d in run_dirs]
    first, config, info = runs[0]
    for other, other_config, other_info in runs[1:]:
        labels, other_labels = info["label_names"], other_info["label_names"]
        if labels != other_labels:
            only = [n for n in labels if n not in other_labels][:3] + [n for n in other_labels if n not in labels][:3]
            detail = f"labels only one of them has: {', '.join(map(repr, only))}" if only else "the same labels in another order"
            raise ValueError(f"{other} and {first} have different label sets ({detail}; see their {INFO})")
        for name in SPLIT_SETTINGS:
            if getattr(other_config, name) != getattr(config, name):
                raise ValueError(f"{other} and {first} were tested on different splits: {name} = "
                                 f"{getattr(other_config, name)!r} and {getattr(config, name)!r}")
    _, (_, _, test) = load_splits(config, label_names=info["label_names"])
    return info["label_names"], test


def ensemble(run_dirs) -> int:
    """Evaluate the members and both ensembles on the runs' common test split; print the table."""
    if len(run_dirs) < 2:
        raise ValueError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    label_names, test = common_test_split(run_dirs)
    member_probs, labels = [], None
    for run_dir in run_dirs:  # one member in memory at a time
        config, _, model, tokenizer = load_run(run_dir)
        logits, labels = split_logits(model, tokenizer, config.max_length, test)
        member_probs.append(softmax_np(logits))
    member_probs = np.stack(member_probs)  # (K, N, C)
    results = {m: ensemble_metrics(member_probs, labels, m, len(label_names)) for m in METHODS}
    say(f"test split: {len(test)} examples, {len(label_names)} classes, {len(run_dirs)} members")
    best = max(results["mean"]["members"], key=lambda m: m["accuracy"])
    rows = [(f"member {run_dir}", member, "") for run_dir, member in zip(run_dirs, results["mean"]["members"])]
    rows += [(f"ensemble, {METHOD_NAMES[m]}", results[m],
              f"  (vs the best member: accuracy {results[m]['accuracy'] - best['accuracy']:+.4f}, "
              f"macro_f1 {results[m]['macro_f1'] - best['macro_f1']:+.4f})") for m in METHODS]
    width = max(len(name) for name, _, _ in rows)
    for name, r, gain in rows:
        say(f"  {name:<{width}}  accuracy {r['accuracy']:.4f}  macro_f1 {r['macro_f1']:.4f}{gain}")
    return 0


def parse_seeds(text: str) -> list:
    """``"0,1,2"`` → [0, 1, 2]: distinct seeds, each allowed as a ``train_seed``; ConfigError otherwise."""
    from .config import FINETUNE
    seeds = [FINETUNE["train_seed"].parse(part, "--seeds") for part in text.split(",")]
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text}: give distinct seeds ≥ 0, such as 0,1,2")
    return seeds


def finetune_seeds(config, seeds, resume: bool = False, overwrite: bool = False) -> int:
    """Train one run per seed in ``config.out``/seed<s> (``train_seed = s``), then print their ensemble."""
    from .finetune import finetune
    run_dirs = []
    for seed in seeds:
        member = dataclasses.replace(config, train_seed=seed, out=str(Path(config.out) / f"seed{seed}"))
        say(f"member seed {seed}: {member.out}")
        finetune(member, resume=resume, overwrite=overwrite)
        run_dirs.append(member.out)
    return ensemble(run_dirs) if len(run_dirs) > 1 else 0
