"""Supervised fine-tuning of a causal LM: the next-token loss on supervised tokens, and its evaluation.

A batch (``tinysft.data.sft.sft_collate``) holds ``input_ids`` (B, T), ``labels`` (B, T): the
token to learn at each position or ``IGNORE`` (−100), not shifted, ``attention_mask`` (B, T),
``position_ids`` (B, T) and, for packed rows, ``segment_ids`` (B, T). Position t predicts the
label of position t + 1:

    target[t] = labels[t+1]  if labels[t+1] ≠ IGNORE, attention_mask[t+1] = 1
                             and segment_ids[t+1] = segment_ids[t]
              = IGNORE       otherwise, and at t = T − 1
    loss_sum  = Σ_t CE(h_t Eᵀ, target[t])      over the supervised t (h: the final hidden states)
    count     = #{t : target[t] ≠ IGNORE}

Which tokens are learned is read from the labels by position, never from token ids: the
end-of-turn ``<|im_end|>`` is also the eos and pad id in SmolLM2's vocabulary, and it is learned
wherever the labels hold it. The head and its loss are ``F.linear_cross_entropy``: a chunk of
rows at a time, the ignored rows never computed, the (tokens × V) logits never held whole.

With ``Trainer(..., loss_fn=causal_lm_loss_sum, count_fn=count_supervised)`` every micro-batch's
sum is divided by the count of the whole optimizer step, so a step's loss is
Σ supervised token losses / Σ supervised tokens over all its micro-batches, and accumulating
k micro-batches gives the gradient of one batch k times the size, whatever their padding.

    >>> trainer = Trainer(model, optimizer, loader, loss_fn=causal_lm_loss_sum, count_fn=count_supervised,
    ...                   evaluate_fn=lambda m: {"loss": evaluate_sft(m, test_batches)})   # doctest: +SKIP

What trains (``DECODER_STRATEGIES``, the choices of ``tinysft sft --strategy``): LoRA adapters
(``tinysft.nn.lora``), or one of ``strategies.prepare``'s strategies over the decoder's layer
groups (``LlamaForCausalLM.layer_groups``), named as there where the meaning is the same;
``frozen_embeddings`` is ``encoder_only`` under a name that fits a model without an encoder.
``decoder_strategy_options`` gives ``discriminative`` the Fisher information of this loss.
"""
import re

import numpy as np

from .. import functional as F
from ..backend import to_device
from ..data.sft import IGNORE
from ..tensor import Tensor, no_grad

__all__ = ["DECODER_STRATEGIES", "decoder_strategy_options", "MODEL_INPUTS", "shifted_targets",
           "causal_lm_loss_sum", "count_supervised", "evaluate_sft", "exact_match", "normalise_answer"]

# the batch entries passed to the model (``LlamaForCausalLM.hidden_states``); labels are not
MODEL_INPUTS = ("attention_mask", "position_ids", "segment_ids")

# a decoder's strategy -> the name ``strategies.prepare`` knows it by (None: LoRA adapters, not prepare's)
DECODER_STRATEGIES = {"lora": None, "full": "full", "layerwise": "layerwise", "frozen_embeddings": "encoder_only",
                      "discriminative": "discriminative"}


def _array(value):
    return np.asarray(value.numpy() if isinstance(value, Tensor) else value)


def shifted_targets(batch) -> np.ndarray:
    """The target of every position (B, T): the label of the next position, or IGNORE (see above)."""
    labels = _array(batch["labels"])
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer token ids of shape (B, T), got {labels.dtype} {labels.shape}")
    targets = np.full(labels.shape, IGNORE, dtype=np.int64)
    targets[:, :-1] = labels[:, 1:]
    keep = np.ones(labels.shape, dtype=bool)
    keep[:, -1] = False  # nothing follows the last position
    for key in ("attention_mask", "segment_ids"):
        if batch.get(key) is not None:
            values = _array(batch[key])
            if values.shape != labels.shape:
                raise ValueError(f"{key} of shape {values.shape} for labels of shape {labels.shape}")
            if key == "attention_mask":
                keep[:, :-1] &= values[:, 1:].astype(bool)  # the next position is a real token
            else:
                keep[:, :-1] &= values[:, 1:] == values[:, :-1]  # ... of the same packed example
    targets[~keep] = IGNORE
    return targets


def count_supervised(batch) -> int:
    """The number of positions that predict a supervised token (the Trainer's ``count_fn``)."""
    return int((shifted_targets(batch) != IGNORE).sum())


def causal_lm_loss_sum(model, batch, chunk_size: int = None) -> Tensor:
    """Σ over supervised positions of the next-token cross-entropy (the Trainer's ``loss_fn``).

    ``model``: a ``LlamaForCausalLM`` (or anything with ``hidden_states`` and ``output_weight``);
    ``chunk_size``: rows of the head per chunk (``F.linear_cross_entropy``'s default when None).
    The batch may come from the host: the token ids and targets are moved to the model's
    device (on a GPU the head's cross-entropy is then the CUDA kernel); the model reads the
    masks and positions on the host.
    """
    device = model.output_weight.device
    inputs = {key: _array(batch[key]) for key in MODEL_INPUTS if batch.get(key) is not None}
    hidden = model.hidden_states(to_device(_array(batch["input_ids"]), device), **inputs)  # (B, T, D)
    return F.linear_cross_entropy(hidden, model.output_weight, to_device(shifted_targets(batch), device),
                                  ignore_index=IGNORE, reduction="sum", chunk_size=chunk_size)


def decoder_strategy_options(strategy: str, loader, decay: float = 0.9, fisher_batches: int = 8) -> dict:
    """The options of ``prepare`` for a decoder's ``strategy``: ``decay`` for layerwise; for
    discriminative, the Fisher information of the causal-LM loss on the first ``fisher_batches``
    batches of ``loader``, each batch's loss the mean over its supervised next tokens."""
    if strategy == "layerwise":
        return {"decay": decay}
    if strategy == "discriminative":
        return {"fisher_loader": loader, "fisher_batches": fisher_batches, "loss_fn": causal_lm_loss_sum,
                "count_fn": count_supervised}
    return {}


def evaluate_sft(model, batches) -> float:
    """Held-out loss per supervised token: Σ loss_sum / Σ count over ``batches``, in eval mode."""
    was_training = getattr(model, "training", False)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for batch in batches:
                total += float(causal_lm_loss_sum(model, batch).item())
                count += count_supervised(batch)
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def normalise_answer(text: str) -> str:
    """Lower case, surrounding space and final punctuation removed, inner runs of space made one."""
    return re.sub(r"\s+", " ", text.strip().strip(".!?\"'`").strip().lower())


def exact_match(model, tokenizer, examples, max_new_tokens: int = 16, batch_size: int = 16) -> float:
    """Accuracy of greedy answers: the fraction of ``examples`` whose generated reply, normalised,
    equals ``normalise_answer(example["answer"])``.

    Each example is a chat (``{"messages": [...]}``: the prompt is the conversation before its
    last assistant turn) or ``{"prompt": ...}``; prompts are rendered with the generation prompt, left-padded in
    batches of ``batch_size`` and decoded greedily (``tinysft.models.generation.generate``)
    until ``<|im_end|>``/eos or ``max_new_tokens``.
    """
    from ..data.chat import render_chatml
    from ..models.generation import default_stop_ids, generate
    examples = list(examples)
    if not examples:
        return float("nan")
    stops = default_stop_ids(model, tokenizer)
    prompts = [tokenizer.encode(render_chatml(_prompt_messages(e), add_generation_prompt=True)) for e in examples]
    was_training = getattr(model, "training", False)
    model.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            replies = generate(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                               stop_ids=stops)
            for example, reply in zip(examples[start:start + batch_size], replies, strict=True):
                text = tokenizer.decode([t for t in reply if t not in stops])
                correct += normalise_answer(text) == normalise_answer(example["answer"])
    finally:
        model.train(was_training)
    return correct / len(examples)


def _prompt_messages(example) -> list:
    """The conversation up to its last assistant turn (the reply to be generated)."""
    if "messages" not in example:
        return [{"role": "user", "content": example["prompt"]}]
    messages = list(example["messages"])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]
