"""A run resumed from a mid-run checkpoint ends bit-identical to an uninterrupted one
(dropout, shuffling, a warmup schedule, AdamW, accumulation, clipping, an L2-SP penalty,
gradual unfreezing, early stopping); a checkpoint write killed mid-way leaves the previous
checkpoint loadable."""
import os

import numpy as np
import pytest

import tinysft.io.checkpoint as checkpoint_module
from tinysft.finetune import EarlyStopping, Trainer, get_weights, prepare
from tinysft.io import load_checkpoint
from tinysft.optim import AdamW, LinearSchedule

from .helpers import loader, tiny_bert, token_data

EPOCHS = 3  # 20 examples, batches of 4, 2 per step: steps of 8, 8, 4 examples; 3 steps per epoch


class Interrupt(Exception):
    pass


class LastWeights:
    """The weights at the end of every epoch, before early stopping restores the best ones."""

    def on_epoch_end(self, trainer, metrics):
        self.weights = get_weights(trainer.model)


class KillAt:
    """Raise at the end of optimizer step ``step`` (before that step's checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, record):
        if trainer.step == self.step:
            raise Interrupt


def build(directory, seed=0, callbacks=(), checkpoint_every=1):
    callbacks = [LastWeights(), *callbacks]
    model = tiny_bert(seed=seed, dropout=0.1)
    plan = prepare(model, "layerwise", lr=3e-3, decay=0.8, weight_decay=0.01, gradual_unfreeze=True)
    for group in plan.param_groups:
        group.update(penalty="l2sp", penalty_lambda=1e-3)
    opt = AdamW(plan.param_groups, lr=3e-3)
    data = token_data(n=20, seed=5)
    return Trainer(model, opt, loader(data, 4, shuffle=True, seed=11), eval_loader=loader(data, 8, shuffle=True),
                   epochs=EPOCHS, accumulation_steps=2, max_grad_norm=1.0,
                   schedule=lambda o, total: LinearSchedule(o, warmup_steps=2, total_steps=total),
                   early_stopping=EarlyStopping(patience=10, metric="loss", mode="max"),  # best epoch: the first
                   on_epoch_start=plan.on_epoch_start,
                   callbacks=callbacks, log_path=os.path.join(directory, "log.jsonl"), log_every=1,
                   layer_of=plan.layer_of(), checkpoint_dir=os.path.join(directory, "ckpt"),
                   checkpoint_every=checkpoint_every)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final weights, history and log."""
    directory = tmp_path_factory.mktemp("reference")
    trainer = build(str(directory))
    history = trainer.fit()
    assert trainer.step == 9 and trainer.early_stopping.best_epoch == 0
    return {"weights": get_weights(trainer.model), "last": trainer.callbacks[0].weights, "history": history,
            "log": (directory / "log.jsonl").read_text()}


def assert_same_weights(weights, expected):
    assert weights.keys() == expected.keys()
    for name in expected:
        assert weights[name].dtype == expected[name].dtype
        assert np.array_equal(weights[name], expected[name]), name  # bit for bit


@pytest.mark.parametrize("kill_at", [2, 4, 5, 7, 9])  # checkpoints at 1, 3 (epoch end), 4, 6 (epoch end), 8
def test_resume_is_bit_identical(tmp_path, reference, kill_at):
    with pytest.raises(Interrupt):
        build(str(tmp_path), callbacks=[KillAt(kill_at)]).fit()
    _, state = load_checkpoint(tmp_path / "ckpt")
    assert state["trainer"]["step"] == kill_at - 1

    resumed = build(str(tmp_path), seed=123)  # other initial weights and RNG: all must come from the checkpoint
    history = resumed.fit()
    assert_same_weights(resumed.callbacks[0].weights, reference["last"])
    assert_same_weights(get_weights(resumed.model), reference["weights"])  # the restored best (epoch 0)
    assert history == reference["history"]
    assert (tmp_path / "log.jsonl").read_text() == reference["log"]


def _partial_tensors_write(real_save_file):
    """A save_file killed half-way: a partial temp file is left behind, nothing is renamed."""
    def save_file(tensors, path, metadata=None, dtypes=None):
        real_save_file(tensors, str(path) + ".full", metadata=metadata)
        with open(str(path) + ".full", "rb") as f:
            data = f.read()
        os.unlink(str(path) + ".full")
        folder, name = os.path.split(str(path))
        with open(os.path.join(folder, f".{name}.tmp-killed"), "wb") as f:
            f.write(data[:len(data) // 2])
        raise Interrupt
    return save_file


def _manifest_write_killed(_):
    def atomic_write_text(path, text):
        raise Interrupt
    return atomic_write_text


@pytest.mark.parametrize("target, make_failing", [("save_file", _partial_tensors_write),
                                                  ("atomic_write_text", _manifest_write_killed)])
def test_killed_checkpoint_write_leaves_the_previous_one(tmp_path, reference, monkeypatch, target, make_failing):
    real = getattr(checkpoint_module, target)
    calls = {"n": 0}

    def failing_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            return make_failing(real)(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, target, failing_on_third)
    with pytest.raises(Interrupt):
        build(str(tmp_path), checkpoint_every=2).fit()  # checkpoints at steps 2, 4, then 6 dies
    monkeypatch.setattr(checkpoint_module, target, real)

    _, state = load_checkpoint(tmp_path / "ckpt")
    assert state["trainer"]["step"] == 4
    resumed = build(str(tmp_path), seed=321, checkpoint_every=2)
    assert resumed.fit() == reference["history"]
    assert_same_weights(resumed.callbacks[0].weights, reference["last"])
    assert_same_weights(get_weights(resumed.model), reference["weights"])
