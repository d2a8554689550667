"""LoRA layers: gradients vs finite differences and the analytic dA/dB, the fused node against the
composition it replaces (bit for bit, and what each keeps for the backward), init, merge round-off,
freezing, target matching and the errors, on single layers and a tiny BERT."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft
from tinysft.optim import AdamW
from tinysft import functional as F
from tinysft import nn
from tinysft.models import BertConfig, BertForSequenceClassification
from tinysft.nn.lora import (LoRALinear, apply_lora, lora_layers, lora_linear, merge_and_unload, merge_lora,
                             unmerge_lora)

TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IDS = np.array([[2, 5, 7, 9, 3, 1], [2, 11, 3, 4, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def tiny_bert(dtype=np.float32):
    tinysft.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY_BERT), num_labels=3).eval()
    return model.astype(dtype) if dtype != np.float32 else model


def lora_layer(n_in, n_out, r, alpha, bias=True, rslora=False, dropout=0.0, dtype=np.float64, seed=0):
    """A LoRALinear whose B is random (non-zero), so every term of the update is exercised."""
    tinysft.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out, bias=bias, dtype=dtype), r, alpha, dropout, rslora=rslora)
    layer.lora_B.weight.data[...] = np.random.default_rng(seed).standard_normal((n_out, r))
    return layer


def parts64(layer):
    """W, b, A, B of a layer as float64 arrays (b = 0 when absent)."""
    w = layer.weight.numpy().astype(np.float64)
    b = layer.bias.numpy().astype(np.float64) if layer.bias is not None else np.zeros(layer.out_features)
    return w, b, layer.lora_A.weight.numpy().astype(np.float64), layer.lora_B.weight.numpy().astype(np.float64)


# ----- gradients
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n_in=st.integers(1, 4), n_out=st.integers(1, 4),
       r=st.integers(1, 3), alpha=st.floats(0.5, 16.0), bias=st.booleans(), rslora=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_gradients_match_finite_differences(lead, n_in, n_out, r, alpha, bias, rslora, seed):
    layer = lora_layer(n_in, n_out, r, alpha, bias=bias, rslora=rslora, seed=seed)
    names = ["weight", "lora_A.weight", "lora_B.weight"] + (["bias"] if bias else [])
    params = dict(layer.named_parameters())
    x = np.random.default_rng(seed + 1).standard_normal((*lead, n_in))

    def fn(x, *weights):
        with nn.swap_parameters(layer, dict(zip(names, weights, strict=True))):
            return layer(x)

    assert tinysft.gradcheck(fn, [x] + [params[n].data for n in names])


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_gradients_match_their_formulas(rslora):
    # dB = s·gᵀ(x Aᵀ),  dA = s·Bᵀ gᵀ x, with the rows of x and g flattened over the leading axes
    layer = lora_layer(5, 4, 3, alpha=6.0, rslora=rslora)
    s = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    assert layer.scaling == s
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 4))
    layer(tinysft.tensor(x)).backward(g)
    _, _, a, b = parts64(layer)
    xf, gf = x.reshape(-1, 5), g.reshape(-1, 4)
    np.testing.assert_allclose(layer.lora_B.weight.grad, s * gf.T @ (xf @ a.T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.lora_A.weight.grad, s * b.T @ gf.T @ xf, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None and layer.bias.grad is None  # the base stays frozen


def test_dropout_acts_on_the_adapter_input_only():
    # the same seed gives the same mask: y = xWᵀ + b + s·((x⊙m) Aᵀ) Bᵀ, dA = s·Bᵀgᵀ(x⊙m)
    p, seed = 0.5, 3
    layer = lora_layer(6, 3, 2, alpha=4.0, dropout=p).train()
    layer.lora_dropout.generator = np.random.default_rng(seed)
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    mask = F.dropout(tinysft.tensor(np.ones((4, 6))), p, True, np.random.default_rng(seed)).numpy()
    assert 0 < (mask == 0).sum() < mask.size  # some dropped, some kept
    y = layer(tinysft.tensor(x))
    y.backward(g)
    w, b, a, bb = parts64(layer)
    xm = x * mask
    np.testing.assert_allclose(y.numpy(), x @ w.T + b + 2.0 * (xm @ a.T) @ bb.T, rtol=1e-12)
    np.testing.assert_allclose(layer.lora_A.weight.grad, 2.0 * bb.T @ g.T @ xm, rtol=1e-12)
    layer.eval()  # no dropout at evaluation
    np.testing.assert_allclose(layer(tinysft.tensor(x)).numpy(), x @ w.T + b + 2.0 * (x @ a.T) @ bb.T, rtol=1e-12)


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n_in=st.integers(1, 4), n_out=st.integers(1, 4),
       r=st.integers(1, 3), bias=st.booleans(), p=st.sampled_from([0.0, 0.3, 0.7]), seed=st.integers(0, 2 ** 16))
def test_the_fused_node_matches_finite_differences_under_a_fixed_mask(lead, n_in, n_out, r, bias, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_in))
    w, a, b = rng.standard_normal((n_out, n_in)), rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    keep = rng.random(x.shape) >= p  # fixed, so the function is deterministic
    inputs = [x, w, a, b] + ([rng.standard_normal(n_out)] if bias else [])

    def fn(x, w, a, b, bias=None):
        return lora_linear(x, w, bias, a, b, 1.7, keep, 1 / (1 - p))

    assert tinysft.gradcheck(fn, inputs)
    y = fn(*(tinysft.tensor(t) for t in inputs)).numpy()  # the formula, written out
    d = x * keep / (1 - p)
    np.testing.assert_allclose(y, x @ w.T + (inputs[4] if bias else 0) + 1.7 * (d @ a.T) @ b.T, rtol=1e-12, atol=1e-12)


def test_the_fused_node_names_what_does_not_fit():
    x, w, a, b = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"input \(2, 3\), W \(4, 3\), A \(2, 4\), B \(4, 2\) do not fit"):
        lora_linear(tinysft.tensor(x), w, None, np.ones((2, 4)), b, 1.0)
    with pytest.raises(ValueError, match=r"keep mask of shape \(3, 2\) for an input of shape \(2, 3\)"):
        lora_linear(tinysft.tensor(x), w, None, a, b, 1.0, np.ones((3, 2), bool))


def composed(layer, x, generator):
    """The layer as F.linear, F.dropout and an addition, each its own node."""
    u = F.linear(F.dropout(x, layer.lora_dropout.p, True, generator), layer.lora_A.weight) * layer.scaling
    return F.linear(x, layer.weight, layer.bias) + F.linear(u, layer.lora_B.weight)


def test_the_fused_node_is_the_composition_bit_for_bit_and_holds_less():
    import tracemalloc
    tinysft.manual_seed(0)
    n, n_in, n_out, r = 64, 96, 80, 4
    layer = LoRALinear(nn.Linear(n_in, n_out), r, 8.0, 0.3).train()
    layer.lora_B.weight.data[...] = np.random.default_rng(1).standard_normal((n_out, r))
    x0 = np.random.default_rng(2).standard_normal((2, n // 2, n_in)).astype(np.float32)
    g = np.random.default_rng(3).standard_normal((2, n // 2, n_out)).astype(np.float32)
    results, held = [], []
    for run in (lambda x: layer(x), lambda x: composed(layer, x, np.random.default_rng(7))):
        layer.lora_dropout.generator = np.random.default_rng(7)  # the same masks in both
        for param in layer.parameters():
            param.grad = None
        x = tinysft.tensor(x0, requires_grad=True)
        tracemalloc.start()
        y = run(x)
        held.append(tracemalloc.get_traced_memory()[0])  # what the graph keeps for the backward, y included
        tracemalloc.stop()
        y.backward(g)
        results.append([y.numpy(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
    for name, fused, reference in zip(["y", "dx", "dA", "dB"], *results, strict=True):
        assert np.array_equal(fused, reference), name
    # the output, the boolean mask and u, against 3 outputs, the float mask and drop(x)
    assert held[0] <= n * (4 * n_out + n_in + 4 * r) + 4096
    assert held[1] >= n * (3 * 4 * n_out + 2 * 4 * n_in)


# ----- initialisation
def test_a_is_kaiming_uniform_and_b_is_zero():
    # kaiming_uniform(a=√5): gain √(2/(1+5)), bound = gain·√3/√fan_in = 1/√in; Var U(−c, c) = c²/3
    tinysft.manual_seed(0)
    n_in, r = 256, 64
    layer = LoRALinear(nn.Linear(n_in, 32), r, alpha=16)
    a = layer.lora_A.weight.numpy().astype(np.float64)
    bound = 1 / math.sqrt(n_in)
    assert a.shape == (r, n_in) and layer.lora_B.weight.shape == (32, r)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.999 * bound  # fills the interval up to its ends
    n = a.size
    assert abs(a.mean()) / math.sqrt(bound ** 2 / 3 / n) < 5  # z-test of the mean
    assert abs(a.var() / (bound ** 2 / 3) - 1) < 5 * math.sqrt(0.8 / n)  # Var of s² for U: (4/5)σ⁴/n
    assert np.all(layer.lora_B.weight.numpy() == 0)
    assert layer.lora_A.weight.dtype == np.float32 == layer.lora_B.weight.dtype


def test_a_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_bert()
    before = model(IDS, MASK).numpy()
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["query", "key", "value", "dense"])
    np.testing.assert_array_equal(model(IDS, MASK).numpy(), before)  # B = 0: exactly the base


# ----- merging
def test_merged_output_is_the_base_plus_scaled_ba(device):
    layer = lora_layer(6, 5, 2, alpha=3.0, dtype=np.float32).to(device)
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    w, b, a, bb = parts64(layer)
    want = x.astype(np.float64) @ (w + 1.5 * bb @ a).T + b
    unmerged = layer(tinysft.tensor(x, device=device)).numpy()
    merged = layer.merge()(tinysft.tensor(x, device=device)).numpy()
    assert layer.merged
    # float32: a few roundings of terms of size ~|x||W|; 1e-5 relative to the output's scale
    scale = np.abs(want).max()
    assert np.abs(unmerged - want).max() < 1e-5 * scale
    assert np.abs(merged - want).max() < 1e-5 * scale
    merged_w = w + 1.5 * bb @ a
    np.testing.assert_allclose(layer.weight.numpy(), merged_w, rtol=0, atol=2e-7 * np.abs(merged_w).max())


def test_unmerge_restores_the_base_within_one_rounding():
    # |W_restored − W| ≤ 2⁻²³·max(|W|, |W'|) elementwise (W' the merged weight), and no drift over cycles
    layer = lora_layer(64, 48, 8, alpha=16.0, dtype=np.float32)
    layer.lora_B.weight.data *= 3
    w0 = layer.weight.numpy().copy()
    layer.merge()
    w_merged = layer.weight.numpy().copy()
    assert np.abs(w_merged - w0).max() > 1  # the update is large compared with W ~ 1/8
    bound = 2.0 ** -23 * np.maximum(np.abs(w0), np.abs(w_merged))
    layer.unmerge()
    assert np.all(np.abs(layer.weight.numpy() - w0) <= bound)
    assert not np.array_equal(layer.weight.numpy(), w0)  # round-off is real here: the bound is what holds
    for _ in range(20):
        layer.merge().unmerge()
    assert np.all(np.abs(layer.weight.numpy() - w0) <= 21 * bound)


def test_merge_and_unmerge_are_idempotent_and_float64_is_exact_enough():
    layer = lora_layer(7, 3, 2, alpha=2.0)  # float64
    w0 = layer.weight.numpy().copy()
    layer.merge()
    once = layer.weight.numpy().copy()
    layer.merge()
    np.testing.assert_array_equal(layer.weight.numpy(), once)
    layer.unmerge().unmerge()
    assert np.all(np.abs(layer.weight.numpy() - w0) <= 2.0 ** -52 * np.maximum(np.abs(w0), np.abs(once)))


def test_model_merge_unmerge_and_unload():
    model = tiny_bert(np.float64)
    base_names = [n for n, _ in model.named_parameters()]
    apply_lora(model, r=2, alpha=4, dropout=0.1, target_modules=["query", "value"])
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data[...] = rng.standard_normal(layer.lora_B.weight.shape) * 0.1
    adapted = model(IDS, MASK).numpy()  # eval mode: dropout off
    merge_lora(model)
    np.testing.assert_allclose(model(IDS, MASK).numpy(), adapted, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    np.testing.assert_allclose(model(IDS, MASK).numpy(), adapted, rtol=1e-12, atol=1e-12)
    merge_and_unload(model)
    assert not lora_layers(model)
    assert [n for n, _ in model.named_parameters()] == base_names
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    np.testing.assert_allclose(model(IDS, MASK).numpy(), adapted, rtol=1e-12, atol=1e-12)


# ----- apply_lora on a model
def test_only_the_adapters_train():
    model = tiny_bert()
    summary = apply_lora(model, r=4, alpha=8, target_modules=["query", "value"])
    names = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    assert list(summary.targets) == names
    adapters = {f"{n}.lora_{k}.weight" for n in names for k in "AB"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    assert summary.trainable == 4 * 4 * (16 + 16) == model.num_parameters(trainable_only=True)
    assert summary.total == model.num_parameters()
    assert "trainable params: 512 ||" in str(summary)
    # base names are kept, so a base checkpoint still loads
    assert {n for n, _ in model.named_parameters()} - adapters == set(tiny_bert().state_dict())
    model.train()
    F.cross_entropy(model(IDS, MASK), np.array([0, 2])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == adapters
    assert all(np.abs(p.grad).max() > 0 for n, p in model.named_parameters() if n.endswith("lora_B.weight"))


def test_training_the_adapters_lowers_the_loss():
    model = tiny_bert()
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["query", "value", "dense"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-2)
    labels = np.array([0, 2])
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(IDS, MASK), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_target_matching_follows_peft():
    # a list matches the last part(s) of the dotted name; a string is a full-match regular expression
    model = tiny_bert()
    names = apply_lora(model, r=1, alpha=1, target_modules=["attention.output.dense"]).targets
    assert names == ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense")
    model = tiny_bert()
    names = apply_lora(model, r=1, alpha=1, target_modules=r".*\.1\.attention\.self\.(query|key)").targets
    assert names == ("bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key")
    with pytest.raises(ValueError, match="no module matches"):
        apply_lora(tiny_bert(), r=1, alpha=1, target_modules=["uery"])  # not a suffix on a dot boundary


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no module matches target_modules \['q_proj'\].*Linear modules here: "
                                         r"backbone\.embeddings|Linear modules here: .*attention\.self\.query"):
        apply_lora(tiny_bert(), target_modules=["q_proj"])
    for r in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="r must be a positive integer"):
            apply_lora(tiny_bert(), r=r, target_modules=["query"])
    for alpha in (math.nan, math.inf, "8"):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            apply_lora(tiny_bert(), alpha=alpha, target_modules=["query"])
    for p in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            apply_lora(tiny_bert(), dropout=p, target_modules=["query"])
    with pytest.raises(TypeError, match=r"word_embeddings \(Embedding\) is not a Linear"):
        apply_lora(tiny_bert(), target_modules=["word_embeddings"])
    with pytest.raises(TypeError, match=r"\(LayerNorm\) is not a Linear"):
        apply_lora(tiny_bert(), target_modules=["LayerNorm"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lora(tiny_bert(), target_modules="(query")
    with pytest.raises(ValueError, match="target_modules must be"):
        apply_lora(tiny_bert(), target_modules=[])
    model = tiny_bert()
    apply_lora(model, target_modules=["query"])
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_lora(model, target_modules=["query"])
    with pytest.raises(TypeError, match="wraps a Linear"):
        LoRALinear(nn.LayerNorm(4), 2, 4)


class TiedHead(nn.Module):
    """An embedding and an output Linear sharing one weight, as tied language models do."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.proj = nn.Linear(4, 4)

    def forward(self, ids):
        return self.lm_head(self.proj(self.embed_tokens(ids)))


def test_tied_weights_are_never_adapted():
    model = TiedHead()
    with pytest.raises(ValueError, match=r"lm_head shares its weight with embed_tokens\.weight"):
        apply_lora(model, target_modules=["lm_head"])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    apply_lora(model, target_modules=["proj"])  # the default way: adapters beside the tie, which stays
    merge_and_unload(model)
    assert model.lm_head.weight is model.embed_tokens.weight


# ----- a tiny random Llama (HF names; the head tied to the embedding)
def tiny_llama():
    try:
        from tinysft.models.llama import LlamaConfig, LlamaForCausalLM
    except ImportError:
        pytest.skip("LlamaForCausalLM not yet available")
    tinysft.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config).eval()


TOKENS = np.array([[1, 5, 9, 3, 7], [1, 2, 30, 4, 4]])


def test_llama_default_targets_every_projection_and_keeps_the_tie():
    model = tiny_llama()
    before = model(TOKENS).numpy()
    summary = apply_lora(model, r=2, alpha=4, dropout=0.0)
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(summary.targets) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in projections)
    np.testing.assert_array_equal(model(TOKENS).numpy(), before)
    assert model.output_weight is model.model.embed_tokens.weight and not model.output_weight.requires_grad
    # q 16→16, k/v 16→8, o 16→16, gate/up 16→24, down 24→16, each r·(in + out), two layers
    assert summary.trainable == 2 * 2 * (32 + 24 + 24 + 32 + 40 + 40 + 40)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data[...] = 0.3 * rng.standard_normal(layer.lora_B.weight.shape)
    adapted = model(TOKENS).numpy()
    assert np.abs(adapted - before).max() > 1e-2
    F.cross_entropy(model(TOKENS)[:, :-1], TOKENS[:, 1:]).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if "lora_" in n}
    merge_and_unload(model)
    assert model.output_weight is model.model.embed_tokens.weight
    scale = np.abs(adapted).max()
    assert np.abs(model(TOKENS).numpy() - adapted).max() < 1e-5 * scale  # float32, merged vs unmerged


def test_llama_embeddings_are_never_targets():
    with pytest.raises(TypeError, match=r"embed_tokens \(Embedding\) is not a Linear"):
        apply_lora(tiny_llama(), target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="no module matches target_modules \\['lm_head'\\]"):
        apply_lora(tiny_llama(), target_modules=["lm_head"])  # tied: the head is the embedding, not a Linear
