"""``tinysft eval RUN``: the run's best weights on its test split, re-created from the same seed.

The labels are the run's own (``label_names`` in run.json), in the run's order: a data file
whose labels were renamed or extended since is refused, naming the label and its line.
"""
import numpy as np

from ..data import DataLoader, tokenizing_collate
from ..data.datasets import UnknownLabelError
from ..finetune.metrics import classification_metrics
from ..functional import cross_entropy
from ..tensor import no_grad, tensor
from .finetune import load_splits
from .output import format_metrics, say
from .run_folder import INFO, load_run


def evaluate(run_dir) -> int:
    """Re-evaluate a run's best weights on its (re-created, identical) test split."""
    config, info, model, tokenizer = load_run(run_dir)
    try:
        _, (_, _, test) = load_splits(config, label_names=info["label_names"])
    except UnknownLabelError as error:
        raise UnknownLabelError(f"{error}: the run never saw it (its labels are in {run_dir}/{INFO})") from None
    labels, logits = [], []
    collate = tokenizing_collate(tokenizer, config.max_length)
    with no_grad():
        for batch in DataLoader(test, 64, shuffle=False, collate=collate):
            logits.append(model(batch["input_ids"], batch["attention_mask"]).numpy())
            labels.append(batch["labels"])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    metrics = {"loss": cross_entropy(tensor(logits), labels).item(),
               **classification_metrics(logits, labels, info["num_labels"])}
    say(f"test ({len(test)} examples): " + format_metrics(metrics))
    return 0
