"""Per-layer dropout: the schedule's rates, and each layer dropping at its own rate in training mode.

The statistical test: every dropout call of a forward pass is recorded with its input and
output; among the n entries whose input is not zero, the number k that come out zero is
Binomial(n, p) for a call at rate p, so |k − n·p| ≤ 5·√(n·p·(1 − p)) fails a correct
implementation with probability about 6·10⁻⁷ per call (and p = 0 must drop nothing). The
rates of neighbouring layers differ by 0.2, about 40 of those standard deviations here.
"""
import math
import re

import numpy as np
import pytest

import tinysft
from tinysft import functional
from tinysft.models import BertConfig, BertForSequenceClassification
from tinysft.nn.transformer import dropout_schedule, parse_dropout_schedule

RATES = [0.0, 0.2, 0.4, 0.6]
EMBEDDINGS, HEAD = 0.1, 0.25


def test_schedules_give_the_rates_bottom_first():
    assert dropout_schedule("linear:0.05:0.2", 4) == [0.05, 0.1, 0.15, 0.2]
    assert dropout_schedule("linear:0.3:0.0", 4) == [0.3, 0.2, 0.1, 0.0]
    assert dropout_schedule("linear:0.1:0.5", 1) == [0.1]
    assert dropout_schedule("0.1,0.2,0.3", 3) == [0.1, 0.2, 0.3]
    assert dropout_schedule("none", 6) is None


@pytest.mark.parametrize("spec, fragment", [
    ("linear:0.1", "expected 'linear:LOW:HIGH'"), ("linear:a:0.2", "expected"), ("0.1,,0.2", "expected"),
    ("", "expected"), ("linear:0.1:1.0", "in [0, 1)"), ("0.1,-0.1", "in [0, 1)"), ("nan", "in [0, 1)"),
])
def test_malformed_schedules_are_refused(spec, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_dropout_schedule(spec)


def test_a_list_must_have_one_rate_per_layer():
    with pytest.raises(ValueError, match="3 rates for 4 layers"):
        dropout_schedule("0.1,0.2,0.3", 4)


def tiny_classifier():
    tinysft.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=len(RATES), num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=EMBEDDINGS,
                        attention_probs_dropout_prob=EMBEDDINGS)
    model = BertForSequenceClassification(config, num_labels=3, dropout=HEAD).astype(np.float64)
    model.bert.encoder.set_dropout(RATES)
    return model


def recorded_forward(model, monkeypatch):
    """[(p, n inputs not zero, k of them zero in the output)] for every dropout call of one forward."""
    calls, real = [], functional.dropout

    def recording(x, p=0.5, training=True, generator=None):
        y = real(x, p, training, generator)
        live = x.numpy() != 0
        calls.append((p, int(live.sum()), int((y.numpy()[live] == 0).sum())))
        return y

    monkeypatch.setattr(functional, "dropout", recording)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 30, size=(64, 16))
    mask = np.ones_like(ids)
    mask[::4, 12:] = 0  # padded keys: attention probabilities that are exactly 0 before dropout
    model(ids, mask)
    return calls


def test_each_layer_drops_at_its_rate_the_embeddings_and_head_at_theirs(monkeypatch):
    model = tiny_classifier().train()
    calls = recorded_forward(model, monkeypatch)
    # in order: embeddings; per layer attention probabilities, attention output, FFN output; the head
    want = [EMBEDDINGS] + [p for p in RATES for _ in range(3)] + [HEAD]
    assert [p for p, _, _ in calls] == want
    for (p, n, k), rate in zip(calls, want):
        assert n >= 1024  # the head's 64 × 16 features; every other call has more
        if rate == 0:
            assert k == 0
        else:
            assert abs(k - n * rate) <= 5 * math.sqrt(n * rate * (1 - rate)), (rate, k / n)


def test_eval_mode_drops_nothing(monkeypatch):
    calls = recorded_forward(tiny_classifier().eval(), monkeypatch)
    assert all(k == 0 for _, _, k in calls)


def test_rates_are_reported_and_checked():
    model = tiny_classifier()
    assert model.bert.encoder.dropout_rates() == [{"attention": p, "attention_output": p, "output": p}
                                                  for p in RATES]
    with pytest.raises(ValueError, match="4 rates"):
        model.bert.encoder.set_dropout([0.1, 0.2])
