"""``tinysft eval RUN``: the run's best weights on its test split, re-created from the same seed."""
import numpy as np

from ..data import DataLoader, load_dataset, tokenizing_collate, train_val_test
from ..finetune.metrics import classification_metrics
from ..functional import cross_entropy
from ..tensor import no_grad, tensor
from .output import format_metrics, say
from .run_folder import load_run


def evaluate(run_dir) -> int:
    """Re-evaluate a run's best weights on its (re-created, identical) test split."""
    config, info, model, tokenizer = load_run(run_dir)
    dataset = load_dataset(config.data, config.max_examples, config.seed)
    _, _, test = train_val_test(dataset, config.val_fraction, config.test_fraction, config.seed)
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
