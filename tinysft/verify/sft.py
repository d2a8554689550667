"""Supervised fine-tuning of a causal LM: the masked next-token loss, accumulation, packing, the chunked head."""
from types import SimpleNamespace

import numpy as np

from . import reference as ref
from .registry import Measure, check

IGNORE, EOS = -100, 2  # EOS is the pad id too, as in SmolLM2's vocabulary
TINY = dict(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, rope_theta=100.0, eos_token_id=EOS,
            pad_token_id=EOS)
# (length, first supervised position) of the examples: an assistant reply closing with its eos
SHAPES = ((7, 4), (3, 1), (9, 5), (5, 2), (4, 3), (6, 3))


def _sft():
    from .. import functional as F
    from ..data.sft import pack_examples, sft_collate
    from ..finetune import Trainer
    from ..finetune.causal_lm import causal_lm_loss_sum, count_supervised
    return SimpleNamespace(loss_sum=causal_lm_loss_sum, count=count_supervised, Trainer=Trainer,
                           pack=pack_examples, collate=sft_collate, linear_cross_entropy=F.linear_cross_entropy)


def _model(rng, dtype):
    from ..models.llama import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**TINY)
    return LlamaForCausalLM(config, generator=np.random.default_rng(rng.integers(2**63))).astype(dtype).eval()


def _examples(rng):
    """Encoded examples {input_ids, labels}: random tokens ending in EOS; supervised from a position on."""
    out = []
    for length, first in SHAPES:
        ids = np.concatenate([rng.integers(3, TINY["vocab_size"], length - 1), [EOS]]).astype(np.int64)
        out.append({"input_ids": ids, "labels": np.where(np.arange(length) >= first, ids, IGNORE)})
    return out


def _reference(model, examples):
    """Per example alone, unpadded: the float64 −log softmax(logits_t)[labels_{t+1}] of every supervised t."""
    losses = []
    for e in examples:
        logits = model(e["input_ids"][None]).numpy()[0].astype(np.float64)  # (T, V)
        for t in np.flatnonzero(e["labels"][1:] != IGNORE):
            row = logits[t]
            top = row.max()
            losses.append(top + np.log(np.exp(row - top).sum()) - row[e["labels"][t + 1]])
    return np.array(losses)


def _gradients(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    grads = {name: np.array(p.grad, dtype=np.float64) for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return grads


def _close_all(m, label, got, want):
    """One part for all tensors: the worst relative error over them."""
    m.close(label, np.concatenate([got[n].ravel() for n in want]), np.concatenate([want[n].ravel() for n in want]))


class _HiddenProbe:
    """A model whose final hidden states are a leaf: its gradient is dL/dh of every position."""

    def __init__(self, model, batch):
        from ..tensor import Tensor
        self.model = model
        self.hidden = Tensor(model.hidden_states(batch["input_ids"], batch["attention_mask"]).data,
                             requires_grad=True)
        self.output_weight = model.output_weight.detach()

    def hidden_states(self, ids, **inputs):
        return self.hidden


@check("sft_masked_loss", "sft",
       formula="target_t = labels_{t+1} (IGNORE where labels_{t+1} = IGNORE or t+1 is padding);  "
               "L = (1/n) Σ_{t: target_t ≠ IGNORE} −log softmax(h_t Eᵀ)[target_t];  dL/dh_t = 0 where ignored",
       method="tiny Llama (13 tokens, 2 layers): 6 right-padded examples, supervised from a position on, eos "
              "(= pad id) closing each: loss_sum/count vs each example alone through the full logits in float64; "
              "count vs n; dL/dh at every position without a target (prompt, eos's own, padding) exactly 0, "
              "at the others vs (softmax(z_t) − onehot)·E/n",
       explanation="""
       A causal LM's position t predicts token t+1, so the label of position t+1 is the target of position
       t; the last position and the positions before padding predict nothing. Supervised positions are read
       from the labels by position: the end-of-turn eos is learned though its id is also the pad id, padding
       never is. The loss of a batch is the mean over its n supervised targets, here loss_sum / count; the
       reference runs every example alone, without padding, through the full (T, V) logits. With z_t = h_tEᵀ,
       dL/dh_t = (softmax(z_t) − onehot(target_t))·E / n, and exactly 0 at a position without a target: an
       ignored row must not even be computed, so its gradient is an exact zero, not a small number.
       """,
       impl=_sft)
def check_sft_masked_loss(rng, dtype, impl):
    m = Measure(dtype)
    model = _model(rng, dtype)
    examples = _examples(rng)
    batch = impl.collate(examples, EOS)
    want = _reference(model, examples)
    count = impl.count(batch)
    m.require("count = number of supervised next-token targets", count == want.size,
              f"count {count}, expected {want.size}")
    m.close("loss_sum / count vs the mean over supervised targets", impl.loss_sum(model, batch).item() / count,
            want.mean())
    probe = _HiddenProbe(model, batch)
    (impl.loss_sum(probe, batch) * (1.0 / count)).backward()
    dh = np.asarray(probe.hidden.grad, dtype=np.float64)  # (B, T, D)
    targets = np.full(batch["labels"].shape, IGNORE)
    targets[:, :-1] = np.where(batch["attention_mask"][:, 1:], batch["labels"][:, 1:], IGNORE)
    ignored = targets == IGNORE
    m.value("max |dL/dh| at positions without a target (exactly 0)", np.abs(dh[ignored]).max(), 0.0)
    h = probe.hidden.numpy().astype(np.float64)[~ignored]  # (n, D)
    e = model.output_weight.numpy().astype(np.float64)
    z = h @ e.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(z)), targets[~ignored]] -= 1
    m.close("dL/dh at supervised positions vs (softmax(z) − onehot)·E / n", dh[~ignored], p @ e / count)
    return m


@check("sft_accumulation", "sft",
       formula="one optimizer step over micro-batches b_1..b_k:  L = Σ_i loss_sum(b_i) / Σ_i count(b_i);  "
               "Δθ equals the step on the one batch b_1 ∪ … ∪ b_k",
       method="tiny Llama, Trainer with SGD (η = 1): 6 examples as 3 micro-batches of 1, 2 and 3 examples, each "
              "padded to its own length (one to 16), accumulation_steps = 3, vs one batch of all 6; Δθ of every "
              "tensor and the step's loss vs the mean over supervised targets of each example alone",
       explanation="""
       Gradient accumulation must give the gradient of the mean over all the step's supervised tokens.
       Averaging each micro-batch's mean and then the k means (the classic bug) weights a token of a
       micro-batch with few supervised tokens more than one of a long micro-batch; the fix divides every
       micro-batch's summed loss by the one count of the whole step. Padding then changes nothing: the
       micro-batches here are padded to different lengths, and the step must equal the step on the
       concatenated batch.
       """,
       impl=_sft)
def check_sft_accumulation(rng, dtype, impl):
    from ..optim import SGD
    m = Measure(dtype)
    seed = rng.integers(2**63)
    examples = _examples(rng)
    reference_loss = None

    def step(batches):
        nonlocal reference_loss
        model = _model(np.random.default_rng(seed), dtype)
        if reference_loss is None:
            reference_loss = _reference(model, examples).mean()
        before = {n: p.numpy().astype(np.float64) for n, p in model.named_parameters()}
        trainer = impl.Trainer(model, SGD(model.parameters(), lr=1.0), batches, accumulation_steps=len(batches),
                               max_steps=1, loss_fn=impl.loss_sum, count_fn=impl.count, progress=False)
        trainer.fit()
        return {n: p.numpy().astype(np.float64) - before[n] for n, p in model.named_parameters()}, \
            trainer.last_record["loss"]

    micro = [impl.collate(examples[:1], EOS), impl.collate(examples[1:3], EOS), impl.collate(examples[3:], EOS)]
    micro[0] = {k: np.pad(v, [(0, 0), (0, 16 - v.shape[1])], constant_values=EOS if k == "input_ids" else
                          IGNORE if k == "labels" else 0) for k, v in micro[0].items()}
    big, big_loss = step([impl.collate(examples, EOS)])
    accumulated, loss = step(micro)
    _close_all(m, "Δθ accumulated over 3 micro-batches vs the one big batch", accumulated, big)
    m.close("the step's loss vs the mean over supervised targets", loss, reference_loss)
    m.close("the big batch's loss vs the same mean", big_loss, reference_loss)
    return m


@check("sft_packing", "sft",
       formula="packed rows: segment s of a row = one example, position ids 0…len−1 per segment, mask "
               "causal ∧ same segment;  loss and every gradient equal those of the examples padded one per row",
       method="tiny Llama: 6 examples packed into rows of 16 tokens by pack_examples, collated with segment "
              "ids, vs the same examples one per row (right-padded): count, loss_sum and the gradient of "
              "every tensor; every segment's position ids restart at 0",
       explanation="""
       Packing puts several examples in one row to waste no compute on padding. It is exact only if no
       example sees another: the attention mask is block-diagonal (causal within a segment), the rotary
       position ids restart at 0 in each segment, and the first token of a segment is not predicted from
       the last token of the previous one. Then each example's hidden states, loss terms and gradients are
       those it has alone. (With the block mask in place, RoPE's relative-position property makes a
       constant offset of a segment's positions invisible to the loss up to rounding, so the restart is
       checked on the position ids themselves; a model with absolute positions would see it.)
       """,
       impl=_sft)
def check_sft_packing(rng, dtype, impl):
    m = Measure(dtype)
    model = _model(rng, dtype)
    examples = _examples(rng)
    unpacked = impl.collate(examples, EOS)
    rows = impl.pack(examples, 16)
    packed = impl.collate(rows, EOS)
    restarts = all(np.array_equal(row["position_ids"][row["segment_ids"] == s],
                                  np.arange(int((row["segment_ids"] == s).sum())))
                   for row in rows for s in np.unique(row["segment_ids"]))
    m.require("position ids restart at 0 in every segment", restarts, "a segment's positions do not start at 0")
    m.require("packed rows are fewer than the examples", len(rows) < len(examples), f"{len(rows)} rows")
    m.require("same number of supervised targets", impl.count(packed) == impl.count(unpacked),
              f"{impl.count(packed)} packed vs {impl.count(unpacked)}")
    want_loss = impl.loss_sum(model, unpacked)
    want = _gradients(model, want_loss)
    loss = impl.loss_sum(model, packed)
    m.close("packed loss_sum vs unpacked", loss.item(), want_loss.item())
    _close_all(m, "packed gradients vs unpacked (every tensor)", _gradients(model, loss), want)
    return m


@check("sft_linear_cross_entropy", "sft",
       formula="chunks C of the non-ignored rows: z_C = h_C Wᵀ, loss_i = lse(z_i) − z_i,t_i;  "
               "G_C = s(softmax(z_C) − onehot);  dh_C = G_C W;  dW = Σ_C G_Cᵀ h_C  (= unchunked head + CE)",
       method="h 10×6, W 9×6, 3 rows ignored, chunks of 4 (not dividing the 7 rows) and of 1: loss, dh and dW "
              "for 'mean' and 'sum' vs the unchunked formula in float64; central differences (float64)",
       explanation="""
       The fused linear cross-entropy computes the output head and its loss a chunk of rows at a time, so
       the (tokens × V) logits never exist whole. Each chunk's logits give its loss terms and the gradient
       G of those logits; the hidden states' gradient of the chunk is G·W, and the head's gradient is the
       sum over chunks of Gᵀh, which must be accumulated over every chunk, not overwritten. Ignored rows
       are skipped: their gradient is 0 and they add nothing to dW.
       """,
       impl=_sft)
def check_sft_linear_cross_entropy(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    h = rng.standard_normal((10, 6)).astype(dtype).astype(np.float64)
    w = rng.standard_normal((9, 6)).astype(dtype).astype(np.float64)
    t = rng.integers(0, 9, 10)
    t[[1, 5, 6]] = IGNORE
    keep = t != IGNORE
    z = h[keep] @ w.T
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    losses = lse - z[np.arange(len(z)), t[keep]]
    g = np.exp(z - lse[:, None])
    g[np.arange(len(z)), t[keep]] -= 1
    for reduction, s in (("mean", 1.0 / keep.sum()), ("sum", 1.0)):
        for chunk in (4, 1):
            hh, ww = Tensor(h.astype(dtype), requires_grad=True), Tensor(w.astype(dtype), requires_grad=True)
            loss = impl.linear_cross_entropy(hh, ww, t, reduction=reduction, chunk_size=chunk)
            loss.backward()
            want_dh = np.zeros_like(h)
            want_dh[keep] = s * g @ w
            m.close(f"{reduction}, chunks of {chunk}: loss", loss.item(), s * losses.sum())
            m.close(f"{reduction}, chunks of {chunk}: dh", hh.grad, want_dh)
            m.close(f"{reduction}, chunks of {chunk}: dW", ww.grad, s * g.T @ h[keep])
    ref.autograd_vs_fd(m, lambda a, b: impl.linear_cross_entropy(a, b, t[:7], reduction="sum", chunk_size=3),
                       [h[:7], w], rng, names=["h", "W"])
    return m
