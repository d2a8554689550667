"""Knowledge distillation against a NumPy formula and its stated gradient; ensembles against
manual averaging and voting."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinysft
from tinysft.finetune import distill, ensemble_predict, evaluate_ensemble, get_weights, kd_loss
from tinysft.finetune.metrics import accuracy, macro_f1
from tinysft.optim import AdamW

from .helpers import loader, tiny_bert, token_data


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_kd(z_s, z_t, y, T, alpha):
    """α·T²·mean_i KL(p_t ‖ p_s) + (1−α)·mean_i CE(z_s, y), in float64 NumPy."""
    p_s, p_t = softmax(z_s / T), softmax(z_t / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=-1).mean()
    ce = -np.log(softmax(z_s)[np.arange(len(y)), y]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@given(n=st.integers(1, 6), c=st.integers(2, 5), T=st.floats(0.5, 5.0), alpha=st.floats(0.0, 1.0),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=40)
def test_kd_loss_value_and_gradient(n, c, T, alpha, seed):
    rng = np.random.default_rng(seed)
    z_s, z_t = rng.normal(size=(n, c)) * 2, rng.normal(size=(n, c)) * 2
    y = rng.integers(0, c, size=n)
    student = tinysft.tensor(z_s, requires_grad=True)
    loss = kd_loss(student, z_t, y, temperature=T, alpha=alpha)
    assert loss.item() == pytest.approx(reference_kd(z_s, z_t, y, T, alpha), rel=1e-10, abs=1e-12)

    loss.backward()
    # ∂/∂z_s of T²·KL is T·(p_s − p_t) per example; the batch mean divides by n
    p_s, p_t = softmax(z_s / T), softmax(z_t / T)
    onehot = np.eye(c)[y]
    expected = alpha * T * (p_s - p_t) / n + (1 - alpha) * (softmax(z_s) - onehot) / n
    np.testing.assert_allclose(student.grad, expected, rtol=1e-9, atol=1e-12)


def test_kd_soft_term_gradient_is_T_times_prob_difference():
    rng = np.random.default_rng(0)
    z_s, z_t, T = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 3.0
    student = tinysft.tensor(z_s, requires_grad=True)
    kd_loss(student, z_t, temperature=T, alpha=1.0, reduction="sum").backward()  # no labels: soft term only
    np.testing.assert_allclose(student.grad, T * (softmax(z_s / T) - softmax(z_t / T)), rtol=1e-10)


def test_kd_ignores_unlabelled_rows():
    rng = np.random.default_rng(1)
    z_s, z_t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    y = np.array([0, 2, -100, 1, -100])
    keep = y != -100
    loss = kd_loss(tinysft.tensor(z_s), z_t, y, temperature=2.0, alpha=0.3)
    assert loss.item() == pytest.approx(reference_kd(z_s[keep], z_t[keep], y[keep], 2.0, 0.3), rel=1e-10)


def test_distill_trains_the_student_and_leaves_the_teacher_alone():
    teacher, student = tiny_bert(seed=1, dropout=0.1), tiny_bert(seed=2)
    teacher_before, student_before = get_weights(teacher), get_weights(student)
    data = token_data()
    trainer = distill(student, teacher, loader(data, 8, shuffle=True), AdamW(student.parameters(), lr=1e-2),
                      temperature=2.0, alpha=0.5, epochs=2, eval_loader=loader(data, 12))
    assert trainer.step == 6 and len(trainer.history) == 2
    teacher_after = get_weights(teacher)
    assert all(np.array_equal(teacher_before[n], teacher_after[n]) for n in teacher_before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    student_after = get_weights(student)
    assert any(not np.array_equal(student_before[n], student_after[n]) for n in student_before)


def test_ensemble_mean_and_vote_match_manual():
    models = [tiny_bert(seed=s) for s in (1, 2, 3)]
    data = token_data(n=15)
    probs = []
    for m in models:
        m.eval()
        probs.append(softmax(m(data["input_ids"], data["attention_mask"]).numpy().astype(np.float64)))
        m.train()
    probs = np.stack(probs)

    mean = ensemble_predict(models, loader(data, 4), method="mean")
    np.testing.assert_allclose(mean["probs"], probs.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(mean["labels"], data["labels"])

    votes = probs.argmax(axis=-1)  # (K, N)
    manual = np.array([np.bincount(votes[:, i], minlength=3).argmax() for i in range(15)])
    vote = ensemble_predict(models, loader(data, 4), method="vote")
    np.testing.assert_array_equal(vote["pred"], manual)

    result = evaluate_ensemble(models, loader(data, 4), method="mean")
    pred = probs.mean(axis=0).argmax(axis=-1)
    assert result["accuracy"] == pytest.approx(accuracy(pred, data["labels"]))
    assert result["macro_f1"] == pytest.approx(macro_f1(pred, data["labels"]))
    nll = -np.log(probs.mean(axis=0)[np.arange(15), data["labels"]]).mean()
    assert result["loss"] == pytest.approx(nll, rel=1e-5)
    assert [r["accuracy"] for r in result["members"]] == pytest.approx(
        [accuracy(p.argmax(-1), data["labels"]) for p in probs])
    assert all(m.training for m in models)
