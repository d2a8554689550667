"""param_groups_with_decay: biases and normalisation weights are not decayed."""
import numpy as np

import tinysft
from tinysft.optim import AdamW, param_groups_with_decay


def named(*names):
    return [(n, tinysft.tensor(np.ones(2, np.float32), requires_grad=True)) for n in names]


def test_split_by_name():
    params = named("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                   "encoder.layer.0.attention.self.query.bias", "encoder.layer.0.output.LayerNorm.weight",
                   "encoder.layer.0.output.LayerNorm.bias", "final_norm.weight")
    decay, exempt = param_groups_with_decay(params, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    ids = {id(p): n for n, p in params}
    assert [ids[id(p)] for p in decay["params"]] == ["embeddings.word_embeddings.weight",
                                                     "encoder.layer.0.attention.self.query.weight"]
    assert len(exempt["params"]) == 4


def test_patterns_are_configurable_and_frozen_params_left_out():
    params = named("head.weight", "head.bias", "ln_f.weight", "frozen.weight")
    params[3][1].requires_grad = False
    decay, exempt = param_groups_with_decay(params, 0.01, no_decay=("ln_",))
    assert [id(p) for p in decay["params"]] == [id(params[0][1]), id(params[1][1])]
    assert [id(p) for p in exempt["params"]] == [id(params[2][1])]


def test_groups_drive_adamw():
    params = named("w", "b.bias")
    opt = AdamW(param_groups_with_decay(params, 0.5), lr=0.1)
    for _, p in params:
        p.grad = np.zeros(2, np.float32)
    opt.step()
    np.testing.assert_allclose(params[0][1].data, 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(params[1][1].data, 1.0)
