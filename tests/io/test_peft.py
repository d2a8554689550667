"""LoRA adapters in PEFT's folder layout: round trips, the fields and keys PEFT writes, the errors,
and a PEFT-saved adapter on a tiny Llama against PEFT's own logits."""
import json
from pathlib import Path

import numpy as np
import pytest

import tinysft
from tinysft.io.peft import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, read_adapter_config, save_adapter
from tinysft.io.safetensors import SafetensorsFile, load_file, save_file
from tinysft.models import BertConfig, BertModel
from tinysft.nn.lora import LLAMA_TARGETS, apply_lora, lora_layers, merge_lora

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IDS = np.array([[2, 5, 7, 9, 3, 1], [2, 11, 3, 4, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def bert():
    tinysft.manual_seed(0)
    return BertModel(BertConfig(**TINY_BERT)).eval()


def adapted_bert(target_modules=("query", "value"), rslora=False, seed=1):
    model = bert()
    apply_lora(model, r=3, alpha=6, dropout=0.1, target_modules=target_modules, rslora=rslora)
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data[...] = rng.standard_normal(layer.lora_B.weight.shape)
    return model


def test_round_trip_restores_the_adapted_model(tmp_path):
    model = adapted_bert(rslora=True)
    want = model(IDS, MASK).numpy()
    assert save_adapter(model, tmp_path, base_model_name_or_path="tiny-bert") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = bert()
    summary = load_adapter(fresh, tmp_path)
    assert summary.targets == tuple(n for n, _ in lora_layers(model))
    np.testing.assert_array_equal(fresh(IDS, MASK).numpy(), want)
    layer = lora_layers(fresh)[0][1]
    assert (layer.r, layer.alpha, layer.rslora, layer.lora_dropout.p) == (3, 6.0, True, 0.1)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_keys_and_config_are_the_ones_peft_writes(tmp_path):
    save_adapter(adapted_bert(), tmp_path, base_model_name_or_path="tiny-bert")
    with SafetensorsFile(tmp_path / WEIGHTS_NAME) as f:
        keys, metadata = f.keys(), f.metadata
        shapes = {k: f.info(k).shape for k in keys}
    want = {f"base_model.model.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
            for i in range(2) for m in ("query", "value") for ab in "AB"}
    assert set(keys) == want and metadata == {"format": "pt"}
    assert shapes["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"] == (3, 16)
    assert shapes["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"] == (16, 3)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "bias", "use_rslora", "fan_in_fan_out", "init_lora_weights", "inference_mode",
                                   "modules_to_save", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 6, "lora_dropout": 0.1,
        "target_modules": ["query", "value"], "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": "tiny-bert"}
    # every field written is one PEFT itself writes, with PEFT's value where it is a fixed default
    peft_saved = json.loads((FIXTURES / "tiny_llama_lora" / CONFIG_NAME).read_text())
    assert set(config) <= set(peft_saved)
    for field in ("peft_type", "task_type", "bias", "fan_in_fan_out", "init_lora_weights", "inference_mode",
                  "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "layers_to_transform",
                  "layers_pattern", "revision"):
        assert config[field] == peft_saved[field], field


def test_targets_that_names_cannot_select_are_saved_as_a_regular_expression(tmp_path):
    model = adapted_bert(target_modules=r"encoder\.layer\.1\.attention\.self\.(query|key)")
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"]
    assert isinstance(targets, str)  # ["query", "key"] would also select layer 0's
    fresh = bert()
    assert load_adapter(fresh, tmp_path).targets == ("encoder.layer.1.attention.self.query",
                                                    "encoder.layer.1.attention.self.key")
    np.testing.assert_array_equal(fresh(IDS, MASK).numpy(), model(IDS, MASK).numpy())


def test_merged_adapters_save_the_same_weights(tmp_path):
    model = adapted_bert()
    save_adapter(model, tmp_path / "a")
    save_adapter(merge_lora(model), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_saving_needs_adapters_with_one_setting(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_adapter(bert(), tmp_path)
    model = bert()
    apply_lora(model, r=2, alpha=4, target_modules=["query"])
    apply_lora(model, r=4, alpha=4, target_modules=["value"])
    with pytest.raises(AdapterError, match="different"):
        save_adapter(model, tmp_path)


def rewrite(folder, config=None, tensors=None):
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / WEIGHTS_NAME)


@pytest.fixture
def saved(tmp_path):
    save_adapter(adapted_bert(), tmp_path)
    return tmp_path, json.loads((tmp_path / CONFIG_NAME).read_text()), dict(load_file(tmp_path / WEIGHTS_NAME))


KEY = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"


@pytest.mark.parametrize("change, message", [
    (lambda c, t: c.update(peft_type="IA3"), "peft_type is 'IA3'"),
    (lambda c, t: c.update(use_dora=True), "use_dora = true is not supported"),
    (lambda c, t: c.update(bias="all"), 'bias = "all" is not supported'),
    (lambda c, t: c.update(rank_pattern={"query": 8}), "rank_pattern"),
    (lambda c, t: c.update(modules_to_save=["classifier"]), "modules_to_save"),
    (lambda c, t: c.pop("r"), "missing field"),
    (lambda c, t: c.update(r=0), "r must be a positive integer"),
    (lambda c, t: c.update(lora_alpha="8"), "lora_alpha must be a finite number"),
    (lambda c, t: c.update(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (lambda c, t: c.update(target_modules="all-linear"), "all-linear"),
    (lambda c, t: c.update(target_modules=["q_proj"]), "no module matches"),
    (lambda c, t: c.update(r=2), rf"{WEIGHTS_NAME}: does not fit the model \(r = 2.*shape mismatches: {KEY} has "
                                 r"shape \(3, 16\), the model needs \(2, 16\)"),
    (lambda c, t: t.pop(KEY), f"missing keys: {KEY}"),
    (lambda c, t: t.update(extra=np.zeros(2, np.float32)), "unexpected keys: extra"),
    (lambda c, t: t.update({KEY: np.full((3, 16), np.nan, np.float32)}), "non-finite values"),
    (lambda c, t: t.update({KEY: np.ones((3, 16), np.int32)}), "non-float"),
])
def test_bad_folders_are_refused_by_name_before_the_model_changes(saved, change, message):
    folder, config, tensors = saved
    change(config, tensors)
    rewrite(folder, config, tensors)
    model = bert()
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder)
    assert not lora_layers(model)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME}: no such file"):
        load_adapter(bert(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME}: invalid JSON"):
        read_adapter_config(tmp_path)
    save_adapter(adapted_bert(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME}: no such file"):
        load_adapter(bert(), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x10\x00")
    with pytest.raises(AdapterError, match="truncated"):
        load_adapter(bert(), tmp_path)


def test_the_peft_saved_config_reads():
    config = read_adapter_config(FIXTURES / "tiny_llama_lora")
    assert config == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": sorted(LLAMA_TARGETS),
                      "use_rslora": False}


# ----- a PEFT-saved adapter on a tiny random Llama (tests/fixtures/make_peft_reference.py)
def tiny_llama():
    try:
        from tinysft.models.llama import LlamaForCausalLM
    except ImportError:
        pytest.skip("LlamaForCausalLM not yet available")
    return LlamaForCausalLM.from_pretrained(FIXTURES / "tiny_llama").eval()


def test_peft_adapter_gives_peft_logits(tmp_path):
    # float32 on both sides: PEFT's float32 logits are 1.7e-6 from its float64 ones; 1e-5 of max|logit|
    # leaves room for a different summation order
    model = tiny_llama()
    reference = load_file(FIXTURES / "peft_reference.safetensors")
    ids, want = reference["input_ids"], reference["logits"]
    base = model(ids).numpy()
    np.testing.assert_allclose(base, reference["base_logits"], rtol=0, atol=1e-5 * np.abs(want).max())
    summary = load_adapter(model, FIXTURES / "tiny_llama_lora")
    assert len(summary.targets) == 2 * len(LLAMA_TARGETS)
    got = model(ids).numpy()
    assert np.abs(want - reference["base_logits"]).max() > 0.1  # the adapter matters here
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # the merged weights are PEFT's merged weights
    merge_lora(model)
    with SafetensorsFile(FIXTURES / "peft_reference.safetensors") as f:
        names = json.loads(f.metadata["checksum_names"])
    params = dict(model.named_parameters())
    got_sums = np.array([[params[n].numpy().astype(np.float64).sum(), np.abs(params[n].numpy()).sum(dtype=np.float64)]
                         for n in names])
    np.testing.assert_allclose(got_sums, reference["checksums"], rtol=1e-5, atol=1e-5)
    # and tinysft's own save of it loads back to the same logits
    save_adapter(model, tmp_path)
    again = tiny_llama()
    load_adapter(again, tmp_path)
    np.testing.assert_allclose(again(ids).numpy(), got, rtol=0, atol=1e-6 * np.abs(want).max())
