"""Encoder stacks, pooling, normalisation and the classification head."""
import numpy as np
import pytest

import tinysft
from tinysft import nn


def test_encoder_stack_names_and_hidden_states():
    enc = nn.TransformerEncoder(3, 8, 2, 16).eval()
    names = [n for n, _ in enc.named_parameters()]
    assert names[0] == "layer.0.attention.self.query.weight" and names[-1] == "layer.2.output.LayerNorm.bias"
    x = tinysft.randn(2, 4, 8)
    last, states = enc(x, np.ones((2, 4), dtype=np.int64), output_hidden_states=True)
    assert len(states) == 4 and states[0] is x and states[-1] is last and last.shape == (2, 4, 8)
    np.testing.assert_allclose(enc.layer[0](x).numpy(), states[1].numpy(), atol=1e-6)


def test_pre_ln_stack_has_final_norm():
    enc = nn.TransformerEncoder(2, 8, 2, 16, norm_first=True).eval()
    assert "final_norm.weight" in dict(enc.named_parameters())
    out = enc(tinysft.randn(1, 3, 8)).numpy()
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)  # LayerNorm last (weight 1, bias 0)


@pytest.mark.parametrize("pooler", [False, True])
def test_classification_head(pooler):
    head = nn.ClassificationHead(6, 3, dropout=0.2, pooler=pooler)
    names = [n for n, _ in head.named_parameters()]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert ("dense.weight" in names) == pooler
    x = tinysft.randn(4, 6)
    assert head(x).shape == (4, 3)
    head.eval()
    expected = x.numpy()
    if pooler:
        expected = np.tanh(expected @ head.dense.weight.data.T + head.dense.bias.data)
    expected = expected @ head.classifier.weight.data.T + head.classifier.bias.data
    np.testing.assert_allclose(head(x).numpy(), expected, atol=1e-5)
