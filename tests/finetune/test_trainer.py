"""The Trainer: gradient accumulation equals the big batch, early stopping, non-finite
losses, the JSONL log, the progress bar, clipping and penalties."""
import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinysft.finetune import EarlyStopping, NonFiniteLossError, ProgressBar, Trainer, get_weights, prepare
from tinysft.finetune.batch import cross_entropy_sum
from tinysft.optim import SGD, AdamW, LinearSchedule

from .helpers import loader, tiny_bert, token_data


def _train(batch_size, accumulation, data, optimizer="adamw", epochs=2, **kwargs):
    model = tiny_bert(dtype=np.float64)
    plan = prepare(model, "full", lr=1e-2)
    opt = AdamW(plan.param_groups, lr=1e-2) if optimizer == "adamw" else SGD(plan.param_groups, lr=0.1,
                                                                            momentum=0.9)
    trainer = Trainer(model, opt, loader(data, batch_size, shuffle=True, seed=7), epochs=epochs,
                      accumulation_steps=accumulation,
                      schedule=lambda o, total: LinearSchedule(o, warmup_steps=1, total_steps=total), **kwargs)
    trainer.fit()
    return get_weights(model), trainer


@given(micro=st.integers(1, 4), k=st.integers(2, 3), n=st.integers(9, 20), ignored=st.integers(0, 3),
       optimizer=st.sampled_from(["adamw", "sgd"]))
@settings(max_examples=10)
def test_accumulation_equals_the_big_batch(micro, k, n, ignored, optimizer):
    """k micro-batches of B == one batch of k·B, with an uneven last batch and ignored labels."""
    data = token_data(n=n, seed=n, ignored=ignored)
    big, big_trainer = _train(micro * k, 1, data, optimizer)
    small, small_trainer = _train(micro, k, data, optimizer)
    assert big_trainer.step == small_trainer.step == 2 * math.ceil(n / (micro * k))
    for name in big:
        np.testing.assert_allclose(small[name], big[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_accumulation_loss_is_the_mean_over_the_full_batch():
    data = token_data(n=10, ignored=3)
    model = tiny_bert(dtype=np.float64)
    trainer = Trainer(model, SGD(model.parameters(), lr=0.0), loader(data, 3), accumulation_steps=4, max_steps=1)
    trainer.fit()
    record = trainer.last_record
    expected = cross_entropy_sum(model, data).item() / 7  # 7 labelled examples in the one step
    assert record["examples"] == 7 and record["loss"] == pytest.approx(expected, rel=1e-12)


class Scripted:
    def __init__(self, values, metric="loss"):
        self.values, self.metric, self.calls = list(values), metric, 0

    def __call__(self, model):
        self.calls += 1
        return {self.metric: self.values[self.calls - 1]}


class Snapshots:
    def __init__(self):
        self.after_epoch = []

    def on_epoch_end(self, trainer, metrics):
        self.after_epoch.append(get_weights(trainer.model))


@pytest.mark.parametrize("values, metric, patience, min_delta, stop_epoch, best_epoch", [
    ([1.0, 0.8, 0.85, 0.9, 0.7, 0.6], "loss", 2, 0.0, 3, 1),       # two bad epochs after epoch 1
    ([1.0, 0.97, 0.96, 0.5, 0.4, 0.3], "loss", 2, 0.05, 2, 0),     # improvements below min_delta count as bad
    ([0.5, 0.6, 0.6, 0.7, 0.7, 0.7], "accuracy", 1, 0.0, 2, 1),    # "max" mode; a tie is not an improvement
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], "loss", 2, 0.0, None, 5),     # never stops: restores the last (best)
])
def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best(values, metric, patience, min_delta,
                                                                      stop_epoch, best_epoch):
    model = tiny_bert()
    snaps = Snapshots()
    stopper = EarlyStopping(patience=patience, min_delta=min_delta, metric=metric)
    trainer = Trainer(model, AdamW(model.parameters(), lr=1e-2), loader(token_data()), epochs=len(values),
                      evaluate_fn=Scripted(values, metric), early_stopping=stopper, callbacks=[snaps])
    history = trainer.fit()
    epochs_run = len(values) if stop_epoch is None else stop_epoch + 1
    assert len(history) == len(snaps.after_epoch) == epochs_run
    assert stopper.stopped == (stop_epoch is not None) and stopper.best_epoch == best_epoch
    final = get_weights(model)
    for name, value in snaps.after_epoch[best_epoch].items():
        assert np.array_equal(final[name], value), name
    if best_epoch != epochs_run - 1:
        assert any(not np.array_equal(final[n], v) for n, v in snaps.after_epoch[-1].items())


def test_non_finite_loss_names_the_step():
    model = tiny_bert()
    bad = {"calls": 0}

    def loss_fn(m, batch):
        bad["calls"] += 1
        loss = cross_entropy_sum(m, batch)
        return loss * float("nan") if bad["calls"] == 4 else loss

    trainer = Trainer(model, AdamW(model.parameters(), lr=1e-3), loader(token_data()), accumulation_steps=2,
                      loss_fn=loss_fn, epochs=1)
    with pytest.raises(NonFiniteLossError, match="at step 2, epoch 0") as error:
        trainer.fit()
    assert error.value.step == 2 and trainer.step == 1
    assert all(p.grad is None for p in model.parameters())


def test_jsonl_log_records_steps_rates_norms_and_update_ratios(tmp_path):
    model = tiny_bert()
    plan = prepare(model, "layerwise", lr=1e-2, decay=0.5)
    opt = AdamW(plan.param_groups, lr=1e-2)
    log = tmp_path / "metrics.jsonl"
    data = token_data()
    Trainer(model, opt, loader(data, 8), eval_loader=loader(data, 12), epochs=2, log_path=log, log_every=1,
            max_grad_norm=0.5, layer_of=plan.layer_of()).fit()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    first = train[0]
    assert first["lr"] == {"head": 1e-2, "bert.encoder.layer.1": 5e-3, "bert.encoder.layer.0": 2.5e-3,
                           "bert.embeddings": 1.25e-3}
    assert set(first["update_ratio"]) == {"head", "bert.encoder.layer.1", "bert.encoder.layer.0", "bert.embeddings"}
    assert all(0 < v < 1 for v in first["update_ratio"].values())
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in train)
    assert set(evals[0]) >= {"loss", "accuracy", "macro_f1"}


def test_update_ratio_matches_a_manual_step():
    model = tiny_bert(dtype=np.float64)
    opt = SGD(model.parameters(), lr=0.1)
    before = get_weights(model)
    trainer = Trainer(model, opt, loader(token_data(), 24), max_steps=1, log_every=1,
                      layer_of={n: "all" for n in before}, log_path=None)
    trainer.log = type("Sink", (), {"write": lambda self, r: None})()  # measure without a file
    trainer.fit()
    after = get_weights(model)
    delta = math.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before))
    weight = math.sqrt(sum((before[n] ** 2).sum() for n in before))
    assert trainer.last_record["update_ratio"]["all"] == pytest.approx(delta / weight, rel=1e-12)


def test_clipping_bounds_the_update():
    data = token_data()
    for max_norm in (None, 1e-3):
        model = tiny_bert(dtype=np.float64)
        before = get_weights(model)
        trainer = Trainer(model, SGD(model.parameters(), lr=1.0), loader(data, 24), max_steps=1,
                          max_grad_norm=max_norm)
        trainer.fit()
        after = get_weights(model)
        step = math.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before))
        if max_norm is None:
            assert step == pytest.approx(trainer.last_record["grad_norm"], rel=1e-9)
        else:
            assert step == pytest.approx(max_norm, rel=1e-4)


def test_penalty_is_added_once_per_step():
    data = token_data()
    model = tiny_bert(dtype=np.float64)
    groups = [{"params": list(model.parameters()), "penalty": "l2", "penalty_lambda": 0.5}]
    trainer = Trainer(model, SGD(groups, lr=0.0), loader(data, 6), accumulation_steps=4, max_steps=1)
    trainer.fit()
    expected = 0.5 * sum((p.data ** 2).sum() for p in model.parameters())
    assert trainer.last_record["penalty"] == pytest.approx(expected, rel=1e-12)


def test_progress_bar_writes_only_when_enabled():
    quiet = io.StringIO()
    bar = ProgressBar(10, stream=quiet)  # not a TTY: disabled
    bar.update(5, loss=0.5)
    bar.close()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    bar = ProgressBar(10, enabled=True, stream=loud, min_interval=0.0)
    bar.update(5, loss=0.5)
    bar.update(10, loss=0.25)
    bar.close()
    text = loud.getvalue()
    assert "step 5/10" in text and "50%" in text and "loss 0.25" in text and text.endswith("\n")
