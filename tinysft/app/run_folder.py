"""The run folder: what ``tinysft finetune`` writes and ``eval`` / ``predict`` read back.

    config.toml           the resolved settings (``tinysft finetune --config`` reads it back)
    run.json              model folder, label names, split sizes, test metrics
    metrics.jsonl         one line per logged step and per evaluation (written by the Trainer)
    model.safetensors     the best weights (HF names plus ``head.*``)
    checkpoint/           the resumable training state, when checkpoint_every > 0
    *.png                 loss/accuracy, learning rate per layer group, update/weight ratio
"""
import json
from pathlib import Path

from ..data import WordPieceTokenizer
from ..io import atomic_write_text, load_file, save_file
from ..models import BertForSequenceClassification, BertModel
from .config import build_config, to_toml

CONFIG, INFO, WEIGHTS, METRICS, CHECKPOINT = "config.toml", "run.json", "model.safetensors", "metrics.jsonl", "checkpoint"


def write_run(out, config, model, info: dict) -> None:
    """The weights, the settings and ``info`` (model folder, labels, sizes, metrics) into ``out``."""
    out = Path(out)
    save_file({name: p.numpy() for name, p in model.named_parameters()}, out / WEIGHTS)
    atomic_write_text(out / CONFIG, to_toml(config.to_dict()))
    atomic_write_text(out / INFO, json.dumps(info, indent=2) + "\n")


def read_run(run_dir):
    """(config, info) of a finished run folder; a clear error if it is not one."""
    run_dir = Path(run_dir)
    for name in (CONFIG, INFO, WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {name} is missing "
                                    "(make one with 'tinysft finetune --out DIR')")
    return build_config(run_dir / CONFIG), json.loads((run_dir / INFO).read_text())


def load_run(run_dir):
    """(config, run info, model with the run's best weights, tokenizer) from a run folder."""
    config, info = read_run(run_dir)
    backbone = BertModel.from_pretrained(info["model_dir"])
    model = BertForSequenceClassification(backbone, info["num_labels"], pooling=config.pooling,
                                          dropout=config.dropout)
    model.load_state_dict(load_file(Path(run_dir) / WEIGHTS, mmap=False))
    model.to(config.device)
    return config, info, model.eval(), WordPieceTokenizer.from_dir(info["model_dir"])
