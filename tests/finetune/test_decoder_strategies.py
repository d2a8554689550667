"""The fine-tuning strategies on tinysft's Llama decoder, tied head and all.

A tiny random decoder trained with the causal-LM loss: its layer groups are the embeddings, one
per decoder layer and the head; a frozen group stays bit-identical through AdamW steps (the tied
output head with the frozen embedding); layer-wise rates are lr·decay^depth; discriminative
rates follow the Fisher formula, recomputed here from the full logits of ``model(ids)`` and
``F.cross_entropy``'s mean over the shifted labels (no chunked head, no ``count_fn``).
"""
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinysft import functional as F
from tinysft.data import DataLoader
from tinysft.data.sft import IGNORE, sft_collate
from tinysft.finetune import Trainer, get_weights, layer_groups, prepare
from tinysft.finetune.causal_lm import (DECODER_STRATEGIES, causal_lm_loss_sum, count_supervised,
                                        decoder_strategy_options)
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM
from tinysft.optim import NO_DECAY, AdamW

PAD = 2
TINY = dict(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, rope_theta=100.0, eos_token_id=PAD, pad_token_id=PAD)
LR = 1e-2


def tiny_decoder(seed=0, dtype=np.float32, **overrides):
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}), generator=np.random.default_rng(seed))
    return model.astype(dtype) if dtype != np.float32 else model


def rows(n=12, seed=0, supervised_first=False):
    """Examples of 4-9 tokens ending in eos, the second half supervised (with ``supervised_first``
    also the first token, which no position predicts: the labels then count one more than the loss)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 10))
        ids = np.concatenate([rng.integers(3, TINY["vocab_size"], length - 1), [PAD]])
        labels = np.where(np.arange(length) >= length // 2, ids, IGNORE)
        if supervised_first:
            labels[0] = ids[0]
        out.append({"input_ids": ids, "labels": labels})
    return out


def loader(items, batch_size=4, shuffle=False):
    return DataLoader(items, batch_size, shuffle=shuffle, collate=partial(sft_collate, pad_id=PAD))


def train(model, plan, steps=3, weight_decay=0.1):
    opt = AdamW(plan.param_groups, lr=LR, weight_decay=weight_decay)  # decay must not touch frozen weights
    Trainer(model, opt, loader(rows(), shuffle=True), max_steps=steps, loss_fn=causal_lm_loss_sum,
            count_fn=count_supervised, progress=False).fit()


def test_layer_groups_bottom_to_top_with_the_tied_head_in_the_embeddings():
    model = tiny_decoder()
    groups = layer_groups(model)
    assert [g for g, _ in groups] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "head"]
    assert [n for n, _ in groups[0][1]] == ["model.embed_tokens.weight"]
    assert [n for n, _ in groups[-1][1]] == ["model.norm.weight"]  # the tied head is the embedding
    assert all(n.startswith(f"model.layers.{i}.") for i in (0, 1) for n, _ in groups[1 + i][1])
    every = [n for _, members in groups for n, _ in members]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters()) and len(set(every)) == len(every)
    untied = layer_groups(tiny_decoder(tie_word_embeddings=False))
    assert [n for n, _ in untied[-1][1]] == ["model.norm.weight", "lm_head.weight"]


def test_full_trains_every_weight_at_lr():
    model = tiny_decoder()
    plan = prepare(model, "full", lr=LR, no_decay=NO_DECAY)
    assert {g["name"]: g["lr"] for g in plan.param_groups} == {"all": LR, "all.no_decay": LR}
    before = get_weights(model)
    train(model, plan)
    after = get_weights(model)
    assert all(not np.array_equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_embeddings_stay_bit_identical_and_a_tied_head_with_them(tied):
    model = tiny_decoder(tie_word_embeddings=tied)
    model.requires_grad_(False)  # prepare makes every weight trainable before it freezes
    plan = prepare(model, DECODER_STRATEGIES["frozen_embeddings"], lr=LR, no_decay=NO_DECAY)
    assert plan.frozen == ["model.embed_tokens.weight"]
    params = dict(model.named_parameters())
    trained_ids = {id(p) for g in plan.param_groups for p in g["params"]}
    assert id(model.output_weight) not in trained_ids if tied else id(model.output_weight) in trained_ids
    assert len(trained_ids) == len(params) - 1
    before = get_weights(model)
    train(model, plan)
    after = get_weights(model)
    for n in before:
        if n == "model.embed_tokens.weight":
            assert np.array_equal(before[n], after[n]) and params[n].grad is None, n
        else:
            assert not np.array_equal(before[n], after[n]), n


@given(decay=st.floats(0.3, 1.0), lr=st.floats(1e-5, 1e-1))
@settings(max_examples=10, deadline=None)
def test_layerwise_rates_are_lr_times_decay_to_the_depth(decay, lr):
    model = tiny_decoder(num_hidden_layers=3)
    plan = prepare(model, "layerwise", lr=lr, **decoder_strategy_options("layerwise", None, decay))
    expected = ["head", "model.layers.2", "model.layers.1", "model.layers.0", "model.embed_tokens"]
    assert [g["name"] for g in plan.param_groups] == expected
    for depth, group in enumerate(plan.param_groups):
        assert group["lr"] == pytest.approx(lr * decay ** depth, rel=1e-12), group["name"]
    assert plan.frozen == []


def test_layerwise_steps_move_each_group_by_its_rate():
    """One AdamW step moves a weight by about its group's lr (Adam's first step is lr·sign(g))."""
    model = tiny_decoder()
    plan = prepare(model, "layerwise", lr=LR, decay=0.5)
    before = get_weights(model)
    train(model, plan, steps=1, weight_decay=0.0)
    after, layer_of = get_weights(model), plan.layer_of()
    rates = {g["name"]: g["lr"] for g in plan.param_groups}
    for n in before:
        moved = np.abs(after[n] - before[n])
        assert moved.max() == pytest.approx(rates[layer_of[n]], rel=1e-3), n


def reference_fisher(model, batches):
    """(1/B) Σ_b (∂L_b/∂θ)², L_b the mean cross-entropy of the full logits over the shifted labels."""
    model.eval()
    fisher = {n: np.zeros(p.shape) for n, p in model.named_parameters()}
    for batch in batches:
        for p in model.parameters():
            p.grad = None
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        targets = np.where(batch["attention_mask"][:, 1:], batch["labels"][:, 1:], IGNORE)  # (B, T-1)
        F.cross_entropy(logits[:, :-1], targets, ignore_index=IGNORE).backward()
        for n, p in model.named_parameters():
            fisher[n] += np.asarray(p.grad, dtype=np.float64) ** 2
    for p in model.parameters():
        p.grad = None
    return {n: f / len(batches) for n, f in fisher.items()}


def test_discriminative_rates_follow_the_fisher_information_of_the_causal_lm_loss():
    model = tiny_decoder(dtype=np.float64)
    data = loader(rows(supervised_first=True))  # labels count one more than the loss per example
    options = decoder_strategy_options("discriminative", data, fisher_batches=2)
    plan = prepare(model, "discriminative", lr=LR, min_scale=1e-6, **options)  # no rate clipped
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and model.training  # restored
    fisher = reference_fisher(model, list(data)[:2])
    importance = {n: f.mean() for n, f in fisher.items()}
    top = max(importance.values())
    rates = {g["name"]: g["lr"] for g in plan.param_groups}
    assert rates.keys() == importance.keys()
    for n, value in importance.items():
        assert rates[n] == pytest.approx(LR * max(value / top, 1e-6), rel=1e-6), n
    assert len(set(rates.values())) == len(rates)  # every tensor at its own rate


def test_discriminative_needs_the_supervised_count_not_the_labels():
    """Dividing by the labels (count_examples) instead of the supervised next tokens changes the rates."""
    model = tiny_decoder(dtype=np.float64)
    data = loader(rows(supervised_first=True))
    options = dict(decoder_strategy_options("discriminative", data, fisher_batches=2), min_scale=1e-6)
    right = {g["name"]: g["lr"] for g in prepare(model, "discriminative", lr=LR, **options).param_groups}
    wrong = {g["name"]: g["lr"] for g in prepare(model, "discriminative", lr=LR,
                                                  **dict(options, count_fn=None)).param_groups}
    assert max(abs(right[n] / wrong[n] - 1) for n in right) > 1e-3
