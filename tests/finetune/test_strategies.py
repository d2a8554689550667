"""Each strategy freezes and groups what it says: frozen weights stay bit-identical with no
gradient, layer-wise rates have the stated ratios, discriminative rates follow the Fisher
formula (recomputed here by explicit per-batch backward passes)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinysft.functional as F
from tinysft.finetune import Trainer, fit, get_weights, layer_groups, prepare
from tinysft.optim import SGD, AdamW, LinearSchedule

from .helpers import loader, tiny_bert, token_data

LR = 1e-2


class Snapshots:
    """Weights after every epoch (a Trainer callback)."""

    def __init__(self):
        self.after_epoch = []

    def on_epoch_end(self, trainer, metrics):
        self.after_epoch.append(get_weights(trainer.model))


def _names(model, prefix):
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def test_layer_groups_bottom_to_top():
    model = tiny_bert()
    assert [g for g, _ in layer_groups(model)] == ["bert.embeddings", "bert.encoder.layer.0",
                                                   "bert.encoder.layer.1", "head"]
    every = [n for _, members in layer_groups(model) for n, _ in members]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())


def test_full_trains_everything_with_one_lr():
    model = tiny_bert()
    plan = prepare(model, "full", lr=LR)
    assert [g["name"] for g in plan.param_groups] == ["all"]
    assert plan.param_groups[0]["lr"] == LR
    assert len(plan.param_groups[0]["params"]) == len(list(model.parameters()))
    before = get_weights(model)
    fit(model, loader(token_data()), strategy="full", lr=LR, epochs=1)
    after = get_weights(model)
    assert all(not np.array_equal(before[n], after[n]) for n in before)


def test_encoder_only_freezes_embeddings_bit_identically():
    model = tiny_bert(dropout=0.1)
    plan = prepare(model, "encoder_only", lr=LR)
    frozen = _names(model, "bert.embeddings")
    assert sorted(plan.frozen) == sorted(frozen)
    trained_ids = {id(p) for g in plan.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[n]) not in trained_ids and not params[n].requires_grad for n in frozen)

    before = get_weights(model)
    opt = AdamW(plan.param_groups, lr=LR, weight_decay=0.1)  # decay must not touch frozen weights
    Trainer(model, opt, loader(token_data(), shuffle=True), epochs=2, on_epoch_start=plan.on_epoch_start).fit()
    after = get_weights(model)
    for n in before:
        if n in frozen:
            assert np.array_equal(before[n], after[n]) and params[n].grad is None, n
        else:
            assert not np.array_equal(before[n], after[n]), n


@given(decay=st.floats(0.3, 1.0), lr=st.floats(1e-5, 1e-1))
@settings(max_examples=15)
def test_layerwise_rates_have_the_stated_ratios(decay, lr):
    model = tiny_bert(layers=3)
    plan = prepare(model, "layerwise", lr=lr, decay=decay)
    names = [g["name"] for g in plan.param_groups]
    assert names == ["head", "bert.encoder.layer.2", "bert.encoder.layer.1", "bert.encoder.layer.0",
                     "bert.embeddings"]
    for depth, group in enumerate(plan.param_groups):
        assert group["lr"] == lr * decay ** depth
        assert plan.scales[group["name"]] == decay ** depth
    # a schedule scales every group by the same factor, so the ratios survive it
    opt = AdamW(plan.param_groups, lr=lr)
    schedule = LinearSchedule(opt, warmup_steps=2, total_steps=10)
    for _ in range(3):
        schedule.step()
    rates = [g["lr"] for g in opt.param_groups]
    assert np.allclose(np.array(rates[1:]) / np.array(rates[:-1]), decay, rtol=1e-12)


def test_layerwise_gradual_unfreezing_one_group_per_epoch():
    model = tiny_bert()
    plan = prepare(model, "layerwise", lr=LR, decay=0.8, gradual_unfreeze=True)
    top_down = [g["name"] for g in plan.param_groups]
    groups = dict(layer_groups(model))
    assert sorted(plan.frozen) == sorted(n for g in top_down[1:] for n, _ in groups[g])

    start = get_weights(model)
    snaps = Snapshots()
    opt = SGD(plan.param_groups, lr=LR)
    Trainer(model, opt, loader(token_data()), epochs=4, on_epoch_start=plan.on_epoch_start,
            evaluate_fn=lambda m: {"loss": 0.0}, callbacks=[snaps]).fit()
    for epoch, weights in enumerate(snaps.after_epoch):
        for i, g in enumerate(top_down):
            changed = [not np.array_equal(start[n], weights[n]) for n, _ in groups[g]]
            # group i (0 = head) starts training in epoch i (attention key biases have a zero
            # gradient by symmetry, so "trained" means some of the group's tensors moved)
            assert any(changed) if i <= epoch else not any(changed), (epoch, g)


def test_discriminative_scales_follow_the_fisher_formula():
    model = tiny_bert()
    data = token_data(n=20, seed=3)
    min_scale = 0.2
    plan = prepare(model, "discriminative", lr=LR, fisher_loader=loader(data, 5), min_scale=min_scale)

    named = list(model.named_parameters())
    assert all(p.grad is None for _, p in named) and model.training  # prepare leaves no trace

    # independent reference: one backward per batch, squared gradients averaged in NumPy
    model.eval()
    fisher = {n: np.zeros(p.shape) for n, p in named}
    for start in range(0, 20, 5):
        for _, p in named:
            p.grad = None
        rows = slice(start, start + 5)
        logits = model(data["input_ids"][rows], data["attention_mask"][rows])
        F.cross_entropy(logits, data["labels"][rows]).backward()
        for n, p in named:
            fisher[n] += p.grad.astype(np.float64) ** 2
    importance = {n: (f / 4).mean() for n, f in fisher.items()}
    top = max(importance.values())
    expected = {n: float(np.clip(v / top, min_scale, 1.0)) for n, v in importance.items()}

    groups = {g["name"]: g for g in plan.param_groups}
    assert sorted(groups) == sorted(n for n, _ in named)  # one group per tensor
    for n, _ in named:
        assert groups[n]["lr"] == pytest.approx(LR * expected[n], rel=1e-6)
        assert plan.scales[n] == pytest.approx(expected[n], rel=1e-6)
    scales = np.array(list(plan.scales.values()))
    assert scales.max() == 1.0 and np.isclose(scales.min(), min_scale)  # both ends of the clip are reached


def test_discriminative_mean_normalisation():
    model = tiny_bert()
    plan = prepare(model, "discriminative", lr=LR, fisher_loader=loader(token_data(), 8), normalize="mean",
                   min_scale=0.05)
    scales = np.array(list(plan.scales.values()))
    assert (scales <= 1).all() and (scales >= 0.05).all() and (scales == 1).sum() > 1


class CountingBackbone:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.model.features(**inputs)


def test_feature_extraction_trains_only_the_head_on_cached_features(tmp_path):
    model = tiny_bert(dropout=0.1)
    backbone = CountingBackbone(model)
    plan = prepare(model, "feature_extraction", lr=LR, backbone=backbone)
    assert [n for n, _ in plan.model.named_parameters()] == ["head.classifier.weight", "head.classifier.bias"]
    data = token_data()
    cache = tmp_path / "train.safetensors"
    train = plan.features(loader(data, 8), shuffle=True, cache=cache)
    assert backbone.calls == 3 and cache.exists()
    model.eval()
    np.testing.assert_allclose(train.dataset.arrays["features"],
                               model.features(data["input_ids"], data["attention_mask"]).numpy(), atol=1e-6)
    model.train()

    before = get_weights(model)
    opt = AdamW(plan.param_groups, lr=LR)
    Trainer(plan.model, opt, train, epochs=3, eval_loader=plan.features(loader(data, 8))).fit()
    assert backbone.calls == 6  # once for the train features, once for the eval features: not per epoch
    after = get_weights(model)
    for n in before:
        if n.startswith("head."):
            assert not np.array_equal(before[n], after[n])
        else:
            assert np.array_equal(before[n], after[n]) and dict(model.named_parameters())[n].grad is None

    # a fresh extractor reads the disk cache while the backbone is unchanged ...
    again = prepare(model, "feature_extraction", lr=LR, backbone=CountingBackbone(model))
    cached = again.features(loader(data, 8), cache=cache)
    assert again.extractor.backbone.calls == 0
    np.testing.assert_array_equal(cached.dataset.arrays["features"], train.dataset.arrays["features"])
    # ... and recomputes once the backbone's weights differ
    dict(model.named_parameters())["bert.encoder.layer.0.output.dense.bias"].data += 1.0
    changed = prepare(model, "feature_extraction", lr=LR, backbone=CountingBackbone(model))
    changed.features(loader(data, 8), cache=cache)
    assert changed.extractor.backbone.calls == 3


def test_feature_extraction_finds_head_and_backbone_on_bert():
    model = tiny_bert()
    data = token_data()
    trainer = fit(model, loader(data), loader(data), strategy="feature_extraction", lr=0.05, epochs=4,
                  schedule=None)
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert."))


def test_weight_decay_split_and_unknown_strategy():
    model = tiny_bert()
    plan = prepare(model, "layerwise", lr=LR, weight_decay=0.01, no_decay=("bias", "LayerNorm.weight"))
    head, head_nd = plan.param_groups[0], plan.param_groups[1]
    assert (head["name"], head_nd["name"]) == ("head", "head.no_decay")
    assert head["weight_decay"] == 0.01 and head_nd["weight_decay"] == 0.0 and head["lr"] == head_nd["lr"]
    with pytest.raises(ValueError, match="unknown strategy"):
        prepare(model, "everything")


def test_an_option_of_another_strategy_is_refused_by_name():
    model = tiny_bert()
    with pytest.raises(TypeError, match=r"'full' takes no option decay \(its options: none\)"):
        prepare(model, "full", lr=LR, decay=0.9)
    with pytest.raises(TypeError, match=r"no option fisher_loader \(its options: decay, gradual_unfreeze, unfreeze_every\)"):
        prepare(model, "layerwise", lr=LR, fisher_loader=[])


def test_fisher_pass_leaves_a_shared_training_loader_in_place():
    model = tiny_bert()
    train = loader(token_data(), 4, shuffle=True)
    next(iter(train))
    before = train.state_dict()
    prepare(model, "discriminative", lr=LR, fisher_loader=train, fisher_batches=3)
    assert train.state_dict() == before
