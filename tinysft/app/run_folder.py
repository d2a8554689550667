"""The run folder: what ``tinysft finetune`` writes and ``eval`` / ``predict`` read back.

    config.toml           the resolved settings, written when training starts (``--config`` reads it back)
    metrics.jsonl         one line per logged step and per evaluation (written by the Trainer)
    checkpoint/           the resumable training state, when checkpoint_every > 0
    model.safetensors     the best weights (HF names plus ``head.*``), written when training ends
    run.json              model folder, label names, split sizes, test metrics, each encoder
                          layer's dropout rates (``dropout_per_layer``): written last,
                          so a folder with run.json holds a finished run
    *.png                 loss/accuracy, learning rate per layer group, update/weight ratio

``metrics.jsonl`` always describes the one run whose state is in the folder: a
run that starts afresh starts an empty log, and a resumed run cuts the log back
to its checkpoint's step. ``start`` decides, before anything is created, what
a new ``finetune`` does with a folder that already holds a run.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

from ..io import atomic_write_text, load_file, save_file
from ..io.checkpoint import MANIFEST
from ..models import BertForSequenceClassification, BertModel
from ..nn.transformer import dropout_schedule
from .config import ConfigError, build_config, to_toml
from .files import FileError, read_json, read_model_config, read_tokenizer, require
from .plots import PLOTS

CONFIG, INFO, WEIGHTS, METRICS, CHECKPOINT = "config.toml", "run.json", "model.safetensors", "metrics.jsonl", "checkpoint"
RUN_FILES = (INFO, WEIGHTS, CHECKPOINT, METRICS, CONFIG, *PLOTS)  # in the order ``clear`` deletes them
INFO_KEYS = {"model_dir": str, "label_names": list, "num_labels": int}  # what eval and predict read
FRESH, RESUME, FINISHED = "fresh", "resume", "finished"
_NOT_COMPARED = ("out", "progress")  # settings a resumed run may change


def start(out, config, resume: bool = False, overwrite: bool = False) -> str:
    """How a run with ``config`` begins in ``out``: FRESH, RESUME (from its checkpoint) or FINISHED.

    A folder holding none of the run files starts afresh. One that holds a run is
    refused (ConfigError naming ``--out``) unless ``overwrite`` (start afresh: the old
    files are deleted by ``clear`` once the new run has loaded) or ``resume``: then a
    finished run is left as it is, a checkpoint is continued if the settings are the
    ones it was started with, and a run killed before its first checkpoint starts afresh.
    Creates and deletes nothing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present or overwrite:
        return FRESH
    if not resume:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                          "--overwrite to start afresh there, or choose another --out")
    if (out / INFO).is_file():
        return FINISHED
    if (out / CONFIG).is_file():
        before = build_config(out / CONFIG).to_dict()
        changed = [k for k, v in config.to_dict().items() if k not in _NOT_COMPARED and before.get(k) != v]
        if changed:
            name = changed[0]
            raise ConfigError(f"--resume: the run in {out} was started with {name} = {before.get(name)!r}, not "
                              f"{getattr(config, name)!r} (see {out / CONFIG}); resume with its settings "
                              "(--config " + str(out / CONFIG) + ") or pass --overwrite")
    return RESUME if (out / CHECKPOINT / MANIFEST).is_file() else FRESH


def clear(out) -> None:
    """Delete the run files in ``out`` (others are left): run.json first, so that a folder
    half-cleared by a crash never passes for a finished run, then the checkpoint's manifest."""
    out = Path(out)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / MANIFEST)
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def begin_run(out, config) -> None:
    """Create ``out`` and record the settings the run starts with."""
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / CONFIG, to_toml(config.to_dict()))


def write_run(out, config, model, info: dict) -> None:
    """The weights, the settings and then ``info`` (model folder, labels, sizes, metrics) into ``out``."""
    out = Path(out)
    save_file({name: p.numpy() for name, p in model.named_parameters()}, out / WEIGHTS)
    atomic_write_text(out / CONFIG, to_toml(config.to_dict()))
    atomic_write_text(out / INFO, json.dumps(info, indent=2) + "\n")


def read_run(run_dir):
    """(config, info) of a finished run folder; a clear error naming the file if it is not one."""
    run_dir = Path(run_dir)
    for name in (CONFIG, INFO, WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {name} is missing "
                                    "(make one with 'tinysft finetune --out DIR')")
    info = require(run_dir / INFO, read_json(run_dir / INFO), INFO_KEYS)
    names = info["label_names"]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise FileError(f"{run_dir / INFO}: label_names must be distinct strings, got {names!r}")
    if info["num_labels"] != len(names):
        raise FileError(f"{run_dir / INFO}: num_labels = {info['num_labels']} but {len(names)} label_names")
    return build_config(run_dir / CONFIG), info


def load_run(run_dir):
    """(config, run info, model with the run's best weights and each encoder layer's dropout rates
    (``set_layer_dropout``), tokenizer) from a run folder."""
    config, info = read_run(run_dir)
    read_model_config(info["model_dir"])  # a spoilt config.json: one line naming it
    backbone = BertModel.from_pretrained(info["model_dir"])
    model = BertForSequenceClassification(backbone, info["num_labels"], pooling=config.pooling,
                                          dropout=config.dropout)
    set_layer_dropout(model.bert.encoder, config, info, Path(run_dir))
    model.load_state_dict(load_file(Path(run_dir) / WEIGHTS, mmap=False))
    model.to(config.device)
    return config, info, model.eval(), read_tokenizer(info["model_dir"])


def set_layer_dropout(encoder, config, info: dict, run_dir: Path) -> None:
    """Give each encoder layer the dropout rates the run trained with: run.json's ``dropout_per_layer``
    (per layer, each of its dropouts by name), else the ``dropout_schedule`` of config.toml (runs that
    did not record the rates); FileError naming the file if they do not fit the encoder."""
    recorded = info.get("dropout_per_layer")
    if recorded is None:
        try:
            rates = dropout_schedule(config.dropout_schedule, len(encoder.layer))
        except ValueError as error:
            raise FileError(f"{run_dir / CONFIG}: {error} (the model has {len(encoder.layer)} layers)") from None
        if rates is not None:
            encoder.set_dropout(rates)
        return
    names = sorted(encoder.layer[0].dropouts()) if len(encoder.layer) else []
    if not isinstance(recorded, list) or len(recorded) != len(encoder.layer) or not all(
            isinstance(rates, dict) and sorted(rates) == names
            and all(type(p) in (int, float) and 0 <= p < 1 for p in rates.values()) for rates in recorded):
        raise FileError(f"{run_dir / INFO}: dropout_per_layer must hold one {{{', '.join(names)}}} object of rates "
                        f"in [0, 1) per encoder layer ({len(encoder.layer)})")
    for layer, rates in zip(encoder.layer, recorded):
        for name, module in layer.dropouts().items():
            module.p = float(rates[name])
