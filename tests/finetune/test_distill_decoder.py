"""The fused distillation ops against float64 NumPy and central finite differences, and a decoder
student distilled on the supervised positions of an SFT batch.

- ``kd_loss`` (logits) and ``linear_kd_loss`` (hidden states and heads, chunked): value against an
  independent NumPy formula; gradients against ``tinysft.gradcheck`` (random shapes, size-1 dims,
  N = 1, a random ignore mask, chunks of every size); the ignored rows' gradient exactly zero; the
  stated gradient α·T·(p_s − p_t) + (1 − α)·(softmax(z_s) − onehot(y)) per row.
- ``student_from_teacher`` of a Llama decoder: its layers are the chosen teacher layers.
- ``DistillationLoss`` on a tiny random Llama pair and an SFT batch: the loss is the NumPy formula
  over the vocabulary at the positions whose next label is supervised, from the models' own logits.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinysft
from tinysft.data.sft import IGNORE
from tinysft.finetune.causal_lm import count_supervised
from tinysft.finetune.distill import DistillationLoss, kd_loss, linear_kd_loss, student_from_teacher
from tinysft.gradcheck import gradcheck
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM

leading_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)  # N = 1 and size-1 dims
temperatures = st.floats(0.5, 4.0)
alphas = st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0.0, 1.0)


def log_softmax(z):
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_rows(z_s, z_t, y, T, alpha):
    """Per row α·T²·Σ p_t (log p_t − log p_s) + (1 − α)·(−log softmax(z_s)_y), float64 NumPy."""
    log_ps, log_pt = log_softmax(z_s / T), log_softmax(z_t / T)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=-1)
    ce = -np.take_along_axis(log_softmax(z_s), y[:, None], axis=-1)[:, 0]
    return alpha * T * T * kl + (1 - alpha) * ce


def reference(z_s, z_t, y, T, alpha, reduction):
    z_s, z_t, y = z_s.reshape(-1, z_s.shape[-1]), z_t.reshape(-1, z_t.shape[-1]), y.reshape(-1)
    keep = y != IGNORE
    rows = reference_rows(z_s[keep], z_t[keep], y[keep], T, alpha)
    return rows.sum() if reduction == "sum" else rows.mean()


def softmax(z):
    return np.exp(log_softmax(z))


def draw_case(data, classes_max=5):
    lead = data.draw(leading_shapes)
    classes = data.draw(st.integers(2, classes_max))
    seed = data.draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=lead)
    ignored = rng.random(lead) < 0.3
    y[ignored] = IGNORE
    y.reshape(-1)[rng.integers(0, y.size)] = rng.integers(0, classes)  # at least one row counts
    return lead, classes, rng, y


@given(data=st.data(), T=temperatures, alpha=alphas, reduction=st.sampled_from(["mean", "sum"]))
@settings(max_examples=25)
def test_kd_loss_against_numpy_and_finite_differences(data, T, alpha, reduction):
    lead, classes, rng, y = draw_case(data)
    z_s, z_t = 2 * rng.standard_normal((*lead, classes)), 2 * rng.standard_normal((*lead, classes))
    student = tinysft.tensor(z_s, requires_grad=True)
    loss = kd_loss(student, z_t, y, temperature=T, alpha=alpha, ignore_index=IGNORE, reduction=reduction)
    assert loss.item() == pytest.approx(reference(z_s, z_t, y, T, alpha, reduction), rel=1e-10, abs=1e-12)
    loss.backward()
    assert np.all(student.grad[y == IGNORE] == 0)  # exactly
    count = 1 if reduction == "sum" else (y != IGNORE).sum()
    onehot = np.eye(classes)[np.where(y == IGNORE, 0, y)]
    stated = (alpha * T * (softmax(z_s / T) - softmax(z_t / T)) + (1 - alpha) * (softmax(z_s) - onehot)) / count
    np.testing.assert_allclose(student.grad, np.where((y == IGNORE)[..., None], 0.0, stated), rtol=1e-9, atol=1e-12)
    assert gradcheck(lambda s: kd_loss(s, z_t, y, temperature=T, alpha=alpha, ignore_index=IGNORE,
                                       reduction=reduction), [z_s])


@given(data=st.data(), T=temperatures, alpha=alphas, reduction=st.sampled_from(["mean", "sum"]))
@settings(max_examples=25)
def test_linear_kd_loss_against_numpy_and_finite_differences(data, T, alpha, reduction):
    lead, classes, rng, y = draw_case(data, classes_max=6)
    width, teacher_width = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    chunk = data.draw(st.integers(1, 4))
    h, w = rng.standard_normal((*lead, width)), rng.standard_normal((classes, width))
    h_t, w_t = rng.standard_normal((*lead, teacher_width)), rng.standard_normal((classes, teacher_width))

    def loss_of(hidden, weight):
        return linear_kd_loss(hidden, weight, h_t, w_t, y, T, alpha, IGNORE, reduction, chunk_size=chunk)

    hidden, weight = tinysft.tensor(h, requires_grad=True), tinysft.tensor(w, requires_grad=True)
    loss = loss_of(hidden, weight)
    assert loss.item() == pytest.approx(reference(h @ w.T, h_t @ w_t.T, y, T, alpha, reduction),
                                        rel=1e-10, abs=1e-12)
    (loss * 2.5).backward()  # an upstream gradient other than 1
    assert np.all(hidden.grad[y == IGNORE] == 0)
    hidden_u, weight_u = tinysft.tensor(h, requires_grad=True), tinysft.tensor(w, requires_grad=True)
    (kd_loss(hidden_u @ weight_u.T, h_t @ w_t.T, y, T, alpha, IGNORE, reduction) * 2.5).backward()  # unchunked
    np.testing.assert_allclose(hidden.grad, hidden_u.grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weight.grad, weight_u.grad, rtol=1e-10, atol=1e-12)
    assert gradcheck(loss_of, [h, w])


def test_linear_kd_loss_holds_no_rows_it_need_not():
    """Every target ignored: a sum of 0 with zero gradients, a mean of NaN; a second backward reruns the chunks."""
    rng = np.random.default_rng(0)
    h, w = tinysft.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True), tinysft.tensor(
        rng.standard_normal((5, 4)), requires_grad=True)
    y = np.full((2, 3), IGNORE)
    loss = linear_kd_loss(h, w, rng.standard_normal((2, 3, 2)), rng.standard_normal((5, 2)), y, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not w.grad.any()
    assert np.isnan(linear_kd_loss(h, w, np.zeros((2, 3, 2)), np.zeros((5, 2)), y, reduction="mean").item())
    y[0, 1] = 3
    loss = linear_kd_loss(h, w, rng.standard_normal((2, 3, 2)), rng.standard_normal((5, 2)), y)
    h.grad = w.grad = None
    loss.backward()
    first = h.grad.copy(), w.grad.copy()
    h.grad = w.grad = None
    loss.backward()
    np.testing.assert_allclose(h.grad, first[0], rtol=1e-12)
    np.testing.assert_allclose(w.grad, first[1], rtol=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda: kd_loss(tinysft.tensor(np.zeros((2, 3))), np.zeros((2, 4)), [0, 1]), "teacher logits of shape"),
    (lambda: kd_loss(tinysft.tensor(np.zeros((2, 3))), np.zeros((2, 3)), [0, 3]), "out of range"),
    (lambda: kd_loss(tinysft.tensor(np.zeros((2, 3))), np.zeros((2, 3)), None, alpha=0.5), "needs alpha=1"),
    (lambda: linear_kd_loss(tinysft.tensor(np.zeros((2, 3))), np.zeros((4, 3)), np.zeros((2, 2)),
                            np.zeros((5, 2)), [0, 1]), "teacher_weight"),
    (lambda: linear_kd_loss(tinysft.tensor(np.zeros((2, 3))), np.zeros((4, 3)), np.zeros((2, 2)),
                            np.zeros((4, 2)), [0, 1], temperature=0.0), "temperature > 0"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises((ValueError, IndexError, TypeError), match=message):
        call()


# ----------------------------------------------------------------------- a decoder student

def tiny_llama(layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=23, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config, generator=np.random.default_rng(seed)).astype(np.float64)
    return model.eval()


def test_the_decoder_student_is_the_teacher_without_its_odd_layers():
    teacher = tiny_llama(5, seed=0)
    student = student_from_teacher(teacher).eval()
    assert student.config.num_hidden_layers == 3 and student.lm_head is None
    ids = np.array([[1, 5, 7, 9, 2, 4]])
    with tinysft.no_grad():
        x = teacher.model.embed_tokens(ids)  # the teacher's layers 0, 2, 4 alone, by hand
        rope = tinysft.functional.rope_cache(np.arange(6)[None], teacher.config.head_dim, teacher.config.rope_theta)
        mask = tinysft.functional.causal_mask(6, 6)
        for i in (0, 2, 4):
            x = teacher.model.layers[i](x, rope, mask, None)
        want = tinysft.functional.linear(teacher.model.norm(x), teacher.output_weight).numpy()
        got = student(ids).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    student.model.layers[1].self_attn.q_proj.weight.data += 1.0  # copies: the teacher is untouched
    assert not np.allclose(student.model.layers[1].self_attn.q_proj.weight.numpy(),
                           teacher.model.layers[2].self_attn.q_proj.weight.numpy())
    assert student_from_teacher(teacher, [3]).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match=r"student layers .* 0\.\.\.4"):
        student_from_teacher(teacher, [0, 5])


def test_the_decoder_loss_is_the_formula_at_the_supervised_positions():
    teacher, student = tiny_llama(2, seed=1), tiny_llama(1, seed=2).train()
    # two rows: the second padded after 4 tokens; labels IGNORE but on positions 2-3 and 5 of the first
    ids = np.array([[1, 3, 4, 5, 6, 2], [1, 7, 8, 2, 2, 2]])
    labels = np.full(ids.shape, IGNORE)
    labels[0, 2:4], labels[0, 5], labels[1, 2:4] = ids[0, 2:4], ids[0, 5], ids[1, 2:4]
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "position_ids": np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 3, 3]])}
    T, alpha = 2.0, 0.4
    loss = DistillationLoss(teacher, T, alpha)(student, batch)
    with tinysft.no_grad():
        z_s = student(ids, mask, batch["position_ids"]).numpy()
        z_t = teacher(ids, mask, batch["position_ids"]).numpy()
    predicting = [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2)]  # the position before each supervised label
    rows = tuple(np.array(p) for p in zip(*predicting))
    targets = np.array([labels[b, t + 1] for b, t in predicting])
    want = reference_rows(z_s[rows], z_t[rows], targets, T, alpha).sum()
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert count_supervised(batch) == len(predicting)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.output_weight.grad is not None and np.abs(student.output_weight.grad).sum() > 0
