"""BertModel on a tiny random config: HF names, loading rules, classifier, layer groups."""
import json

import numpy as np
import pytest

import tinysft
from tinysft import nn
from tinysft.backend import to_device
from tinysft.io.safetensors import load_file, save_file
from tinysft.models import BertConfig, BertForSequenceClassification, BertModel, layer_groups

TINY = {"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def hf_names(layers):
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            names += [p + part + ".weight", p + part + ".bias"]
    return names + ["pooler.dense.weight", "pooler.dense.bias"]


@pytest.fixture
def tiny():
    tinysft.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


IDS = np.array([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def test_parameter_names_match_hugging_face(tiny):
    assert [n for n, _ in tiny.named_parameters()] == hf_names(2)
    assert tiny.encoder.layer[1].attention.self.query.weight.shape == (8, 8)
    assert tiny.embeddings.word_embeddings.padding_idx == 0


def test_config_from_json_ignores_unknown_fields_and_checks_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "bert", "use_cache": True}))
    assert BertConfig.from_json(tmp_path) == BertConfig(**TINY)
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(**{**TINY, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="unknown activation"):
        BertConfig(**{**TINY, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="absolute"):
        BertConfig(**{**TINY, "position_embedding_type": "relative_key"})
    assert isinstance(BertModel(BertConfig(**{**TINY, "hidden_act": "gelu_new"})).encoder.layer[0]
                      .intermediate.intermediate_act_fn, nn.GELU)


def test_forward_shapes_token_types_and_limits(tiny):
    out = tiny(IDS, MASK)
    assert out.shape == (2, 5, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(tiny(IDS, MASK, np.zeros_like(IDS)).numpy(), out.numpy())
    assert not np.allclose(tiny(IDS, MASK, np.ones_like(IDS)).numpy(), out.numpy())
    # padding columns do not change the real tokens' states
    np.testing.assert_allclose(tiny(IDS[1:, :3], MASK[1:, :3]).numpy(), out.numpy()[1:, :3], atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny(np.zeros((1, 13), dtype=np.int64))
    assert tiny.pooled_output(out).shape == (2, 8)


def test_save_and_from_pretrained_round_trip_with_hf_quirks(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    loaded = BertModel.from_pretrained(folder)
    assert not loaded.training and loaded.name_or_path == folder
    np.testing.assert_array_equal(loaded(IDS, MASK).numpy(), tiny(IDS, MASK).numpy())

    # a checkpoint as BertForSequenceClassification saves it: bert. prefix, buffers, old gamma/beta names
    weights = {("bert." + k): v for k, v in load_file(folder / "model.safetensors").items()}
    weights["bert.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
    weights["bert.encoder.layer.0.output.LayerNorm.gamma"] = weights.pop("bert.encoder.layer.0.output.LayerNorm.weight")
    del weights["bert.pooler.dense.weight"], weights["bert.pooler.dense.bias"]
    save_file(weights, folder / "model.safetensors")
    loaded = BertModel.from_pretrained(folder)
    assert loaded.pooler is None  # none in the file, none in the model
    np.testing.assert_array_equal(loaded(IDS, MASK).numpy(), tiny(IDS, MASK).numpy())


def test_from_pretrained_strict_errors_name_the_keys(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    weights["cls.predictions.bias"] = np.zeros(50, np.float32)
    weights["embeddings.word_embeddings.weight"] = np.zeros((51, 8), np.float32)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(nn.StateDictError) as info:
        BertModel.from_pretrained(folder)
    message = str(info.value)
    assert "model.safetensors" in message and "encoder.layer.1.output.dense.bias" in message
    assert "cls.predictions.bias" in message and "strict=False" in message and "(51, 8)" in message
    del weights["embeddings.word_embeddings.weight"]
    weights["embeddings.word_embeddings.weight"] = np.zeros((50, 8), np.float32)
    save_file(weights, folder / "model.safetensors")
    model = BertModel.from_pretrained(folder, strict=False)
    np.testing.assert_array_equal(model.encoder.layer[1].output.dense.bias.data.shape, (8,))


@pytest.mark.parametrize("pooling,use_pooler", [("mean", False), ("cls", False), ("cls", True)])
def test_sequence_classifier_trains_end_to_end(tiny, pooling, use_pooler):
    clf = BertForSequenceClassification(tiny, num_labels=3, pooling=pooling, use_pooler=use_pooler, dropout=0.0)
    assert (clf.bert.pooler is not None) == use_pooler
    logits = clf(IDS, MASK)
    assert logits.shape == (2, 3)
    tinysft.functional.cross_entropy(logits, np.array([0, 2])).backward()
    missing = [n for n, p in clf.named_parameters() if p.grad is None]
    # embeddings of ids never used get zero (not None) gradient; every parameter is reached
    assert missing == []
    names = [n for n, _ in clf.named_parameters()]
    assert names[0] == "bert.embeddings.word_embeddings.weight" and names[-1] == "head.classifier.bias"


def test_classifier_rejects_bad_options(tiny):
    with pytest.raises(ValueError, match="pooling"):
        BertForSequenceClassification(tiny, 2, pooling="max")
    with pytest.raises(ValueError, match="use_pooler"):
        BertForSequenceClassification(tiny, 2, pooling="mean", use_pooler=True)
    clf = BertForSequenceClassification(BertConfig(**TINY), 4)
    assert clf.bert.pooler is None and clf(IDS, MASK).shape == (2, 4)


def test_layer_groups_bottom_up_and_complete(tiny):
    clf = BertForSequenceClassification(tiny, num_labels=2, pooling="cls", use_pooler=True)
    groups = layer_groups(clf, named=True)
    assert [g for g, _ in groups] == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    flat = [n for _, members in groups for n, _ in members]
    assert sorted(flat) == sorted(n for n, _ in clf.named_parameters()) and len(flat) == len(set(flat))
    assert [n for n, _ in groups[-1][1]] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                             "head.classifier.weight", "head.classifier.bias"]
    plain = layer_groups(tiny)
    assert [g for g, _ in plain] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]
    assert all(isinstance(p, nn.Parameter) for _, ps in plain for p in ps)
    with pytest.raises(TypeError):
        layer_groups(nn.Linear(2, 2))


def test_freeze_backbone_patterns_on_bert(tiny):
    clf = BertForSequenceClassification(tiny, num_labels=2)
    frozen = clf.freeze(["bert.embeddings", "bert.encoder.layer.0"])
    assert len(frozen) == 5 + 16 and all(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in frozen)
    assert clf.num_parameters(trainable_only=True) == clf.num_parameters() - sum(
        p.size for n, p in clf.named_parameters() if n in frozen)


def test_embed_and_encode_with_a_toy_tokenizer(tiny):
    def tokenizer(texts, max_length, padding, truncation):
        rows = [[2] + [5 + len(w) % 40 for w in t.split()][: max_length - 2] + [3] for t in texts]
        width = max(map(len, rows))
        ids = np.array([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}

    tiny.train()
    texts = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii"]
    out = tiny.encode(texts, tokenizer, batch_size=2)
    assert tiny.training  # restored
    assert out.shape == (3, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    one = tiny.encode("dddd", tokenizer)
    np.testing.assert_allclose(one[0], out[1], atol=1e-6)
    tiny.eval()
    batch = tokenizer(texts, 16, True, True)
    np.testing.assert_allclose(tiny.embed(batch["input_ids"], batch["attention_mask"]).numpy(), out, atol=1e-6)


def test_forward_and_backward_agree_across_devices(device):
    """The same tiny classifier on ``device`` matches the CPU run (skipped without a GPU)."""
    tinysft.manual_seed(0)
    cpu = BertForSequenceClassification(BertConfig(**TINY), num_labels=3, dropout=0.0).eval()
    tinysft.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(**TINY), num_labels=3, dropout=0.0).eval().to(device)
    losses = []
    for model in (cpu, other):
        loss = tinysft.functional.cross_entropy(model(IDS, MASK), np.array([0, 2]))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), (_, b) in zip(cpu.named_parameters(), other.named_parameters()):
        assert b.device == device
        np.testing.assert_allclose(b.numpy(), a.numpy())
        np.testing.assert_allclose(to_device(b.grad, "cpu"), a.grad, atol=1e-5, err_msg=name)
