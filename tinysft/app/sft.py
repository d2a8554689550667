"""``tinysft sft``: instruction-tune a causal decoder, test it before and after, export the tuned model.

By default: SmolLM2-135M-Instruct with LoRA adapters (r = 16, α = 32, on all seven projections of
every layer; ``--strategy`` full, layerwise, frozen_embeddings or discriminative train the weights
themselves, see ``tinysft.finetune.causal_lm.DECODER_STRATEGIES``) on the built-in WordNet
questions (a noun's category, a word's meaning; split by synset, no lemma shared), sized for
about ten minutes on two CPU cores (``--device cuda``: on a GPU). Before and after training the
test split is evaluated: the held-out loss per supervised token, and the
exact-match accuracy of greedy answers to the category questions (for a JSONL file: to every
test example, against its last reply).

The run folder (``--out``):

    config.toml, run.json         the settings; sizes, before/after figures, steps, time, tokens/s
    metrics.jsonl, *.png          the training log (Trainer) and its plots
    adapter/                      adapter_config.json + adapter_model.safetensors (PEFT's layout; LoRA only)
    config.json, model.safetensors  the merged model in Hugging Face's layout (transformers loads the folder)
    model-Q8_0.gguf               the merged model as GGUF, with the tokenizer and chat template

so ``tinysft chat RUN_DIR`` (and ``generate --model RUN_DIR``, ``serve RUN_DIR``) talk to the tuned
model. ``--show-mask`` prints a few training examples with their trained and ignored tokens and
exits. An ``--out`` that holds a run is refused unless ``--overwrite``.

Under ``mpirun -n W tinysft sft ...`` the W ranks train one run data-parallel, as
``tinysft finetune`` does: ``batch_size`` is the global batch, the loss is normalised by the
supervised tokens of all ranks, every rank evaluates the whole test split (the same
figures), and rank 0 alone prints and writes the run folder.
"""
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from .. import distributed as dist
from .. import rng
from ..backend import xp_for
from ..data.bpe import BPETokenizer
from ..data.loader import DataLoader
from ..data.sft import encode_examples, pack_examples, read_sft_jsonl, render_mask, sft_collate, wordnet_sft_splits
from ..finetune import Trainer, prepare
from ..finetune.callbacks import ProgressBar
from ..finetune.causal_lm import (DECODER_STRATEGIES, causal_lm_loss_sum, count_supervised, decoder_strategy_options,
                                  evaluate_sft, exact_match)
from ..io.atomic import atomic_write_text
from ..io.peft import save_adapter
from ..models.export import export_gguf, save_pretrained, tokenizer_metadata
from ..nn.lora import apply_lora, merge_and_unload
from ..optim import NO_DECAY, AdamW, param_groups_with_decay, schedule_by_name
from .config import ConfigError, to_toml
from .generate import decoder_paths, load_decoder
from .output import say
from .plots import PLOTS, plot_run
from .run_folder import CONFIG, INFO, METRICS

ADAPTER = "adapter"
EVAL_BATCH = 16  # examples per forward when evaluating


def gguf_name(config) -> str:
    return f"model-{config.gguf_dtype}.gguf"


def run_files(config) -> tuple:
    """What a finished sft run folder holds (``--overwrite`` deletes these and nothing else)."""
    return (INFO, CONFIG, METRICS, ADAPTER, "config.json", "model.safetensors", gguf_name(config), *PLOTS)


def sft(config, show_mask: bool = False, overwrite: bool = False) -> int:
    """Tune, evaluate before and after, write the run folder; see the module docstring."""
    from .finetune import on_every_rank
    return on_every_rank(config, lambda settings: _sft(settings, show_mask, overwrite))


def _sft(config, show_mask: bool, overwrite: bool) -> int:
    started = time.perf_counter()
    xp_for(config.device)  # a DeviceError (no CuPy, or no GPU) before anything is loaded or made
    out = Path(config.out)
    present = [name for name in run_files(config) if (out / name).exists()]
    if present and not show_mask and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(present)}): pass --overwrite to replace "
                          "it, or choose another --out")
    rng.manual_seed(config.seed)
    model_path, tokenizer_path = decoder_paths(config.model, config.tokenizer)
    train_examples, test_examples = load_examples(config)
    if show_mask:
        return print_masks(BPETokenizer.from_gguf(tokenizer_path), train_examples, config)
    model, tokenizer = load_decoder(config.model, config.tokenizer)
    model.to(config.device)  # each batch follows it in the loss (causal_lm_loss_sum)
    train, counts = encode_train(tokenizer, train_examples, config)
    say(f"data: {config.data} — train {len(train)} examples ({counts['truncated']} cut to {config.max_length} "
        f"tokens, {counts['dropped']} without a supervised token left out), test {len(test_examples)}")
    rows = pack_examples(train, config.max_length) if config.packing else train
    collate = partial(sft_collate, pad_id=pad_id(model))
    loader = DataLoader(rows, config.batch_size // (config.accumulation * dist.world_size()), shuffle=True,
                        seed=config.seed, collate=collate, num_replicas=dist.world_size(), rank=dist.rank())
    evaluated = test_examples[:config.eval_examples or None]
    before = evaluate(model, tokenizer, evaluated, config)
    say(f"before: {format_figures(before)}")

    param_groups, plan = prepare_model(model, config, loader)
    say(f"model: {model_path} — {plan}; {'packed rows' if config.packing else 'examples'} of at most "
        f"{config.max_length} tokens, {config.batch_size} per step, device {config.device}")
    if dist.is_main():
        for name in present:  # --overwrite: the old run goes only once the new one has loaded
            remove(out / name)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG, to_toml(config.to_dict()))
    dist.barrier("the run folder's creation")
    trainer, progress = build_trainer(model, param_groups, config, loader, out)
    train_started = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - train_started
    progress.close()
    progress.tokens = int(dist.all_reduce_sum([progress.tokens], "the count of tokens")[0])  # of every rank

    after = evaluate(model, tokenizer, evaluated, config)
    say(f"after:  {format_figures(after)}")
    if not dist.is_main():
        return 0
    model.to("cpu")  # the files are written from the host's copy
    export_model(model, config, out, model_path, tokenizer_path)
    seconds = time.perf_counter() - started
    atomic_write_text(out / INFO, json.dumps({
        "command": "sft", "model": str(model_path), "tokenizer": str(tokenizer_path),
        "sizes": {"train": len(train), "rows": len(rows), "test": len(test_examples), "evaluated": len(evaluated)},
        "before": before, "after": after, "steps": trainer.step, "train_seconds": round(train_seconds, 1),
        "seconds": round(seconds, 1), "tokens_per_second": round(progress.tokens / train_seconds, 1),
    }, indent=2) + "\n")
    written = plot_run(out)
    say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s, {progress.tokens / train_seconds:.0f} "
        f"tokens/s; {seconds:.0f} s in all; merged model as config.json + model.safetensors and "
        f"{gguf_name(config)}" + (f"; plots: {', '.join(p.name for p in written)})" if written else ")"))
    say(f"talk to it: tinysft chat {out}")
    return 0


def export_model(model, config, out: Path, model_path, tokenizer_path) -> None:
    """The adapters (LoRA) in ``out/adapter``, then the merged model as config.json +
    model.safetensors and as GGUF with the tokenizer of ``tokenizer_path``."""
    if config.strategy == "lora":
        save_adapter(model, out / ADAPTER, base_model_name_or_path=str(model_path))
        merge_and_unload(model)
    save_pretrained(model, out)
    export_gguf(model, out / gguf_name(config), tokenizer_metadata(tokenizer_path), config.gguf_dtype,
                name=f"{Path(model_path).stem} tuned by tinysft sft")


def encode_train(tokenizer, examples, config) -> tuple:
    """(encoded examples, counts) of the training split; an error if none has a supervised token."""
    train, counts = encode_examples(tokenizer, examples, config.train_on, config.max_length)
    if not train:
        raise ValueError(f"no training example of {config.data} has a supervised token left within max_length "
                         f"{config.max_length} (train_on {config.train_on})")
    return train, counts


def print_masks(tokenizer, examples, config, count: int = 3) -> int:
    """``--show-mask``: the first few training examples with their trained and ignored tokens."""
    for enc in encode_train(tokenizer, examples[:count], config)[0]:
        say(render_mask(tokenizer, enc))
    say("(trained tokens " + ("in bold green, ignored ones dim)" if sys.stdout.isatty() else "between ⟦ and ⟧)"))
    return 0


def load_examples(config) -> tuple:
    """(train, test) examples. WordNet: split by synset (no lemma in both); a file: shuffled by
    seed, then split. Each test example gets its ``answer`` (the last reply) for exact match."""
    limit = config.max_examples or None
    if config.data == "wordnet":
        train, _, test = wordnet_sft_splits(limit, config.seed, fractions=(1 - config.test_fraction, 0.0,
                                                                           config.test_fraction))
        return train, test
    examples = read_sft_jsonl(config.data)
    order = np.random.default_rng(config.seed).permutation(len(examples))[:limit]
    examples = [examples[i] for i in order]
    n_test = round(config.test_fraction * len(examples))
    if len(examples) < 2 or n_test == 0 or n_test == len(examples):
        raise ValueError(f"{config.data}: {len(examples)} examples cannot be split with test_fraction "
                         f"{config.test_fraction:g} (need at least one for training and one for the test)")
    test = [dict(e, answer=last_reply(e)) for e in examples[:n_test]]
    return examples[n_test:], test


def last_reply(example) -> str:
    if "completion" in example:
        return example["completion"]
    return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")


def pad_id(model) -> int:
    config = model.config
    return next(i for i in (config.pad_token_id, config.eos_token_id, 0) if i is not None)


def evaluate(model, tokenizer, examples, config) -> dict:
    """Held-out loss per supervised token and exact-match accuracy (category questions of WordNet;
    every example of a file)."""
    encoded, _ = encode_examples(tokenizer, examples, config.train_on, config.max_length)
    batches = [sft_collate(encoded[i:i + EVAL_BATCH], pad_id(model)) for i in range(0, len(encoded), EVAL_BATCH)]
    answered = [e for e in examples if e.get("kind", "category") == "category"]
    return {"loss": round(evaluate_sft(model, batches), 4),
            "exact_match": round(exact_match(model, tokenizer, answered, batch_size=EVAL_BATCH), 4),
            "answered": len(answered)}


def format_figures(figures: dict) -> str:
    return (f"test loss {figures['loss']:.4f} per supervised token, exact match {figures['exact_match']:.1%} "
            f"of {figures['answered']} answers")


def prepare_model(model, config, loader) -> tuple:
    """(AdamW's parameter groups, what was done in words): the adapters of LoRA, or the plan of
    ``prepare`` for the other strategies (``loader``: the batches of discriminative's Fisher
    information). No weight decay on the norms."""
    if config.strategy == "lora":
        summary = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                             config.lora_targets.split(","), rslora=config.rslora)
        return (param_groups_with_decay(model.named_parameters(), config.weight_decay),
                f"LoRA r={config.lora_r}, alpha={config.lora_alpha:g} on {len(summary.targets)} projections: "
                f"{summary.trainable:,} of {summary.total:,} parameters train")
    strategy = DECODER_STRATEGIES[config.strategy]
    plan = prepare(model, strategy, config.lr, weight_decay=config.weight_decay, no_decay=NO_DECAY,
                   **decoder_strategy_options(strategy, loader, config.decay))
    return plan.param_groups, describe_plan(config.strategy, plan, model)


def describe_plan(strategy: str, plan, model, shown: int = 4) -> str:
    """``strategy``'s plan in words: the parameters trained, every group's lr (a group split for
    weight decay counted once; past ``shown`` groups the first few and the last), what is frozen."""
    trained = sum(p.size for g in plan.param_groups for p in g["params"])
    if strategy == "full":
        return f"full fine-tuning of {trained:,} parameters at lr {plan.param_groups[0]['lr']:.3g}"
    rates = {}
    for group in plan.param_groups:
        rates.setdefault(group["name"].removesuffix(".no_decay"), group["lr"])
    if strategy == "discriminative":
        rates_text = (f"per-tensor lr from the Fisher information, {min(rates.values()):.3g} to "
                      f"{max(rates.values()):.3g} over {len(rates)} tensors")
    else:
        named = [f"{name} {lr:.3g}" for name, lr in rates.items()]
        if len(named) > shown + 1:
            named = named[:shown] + [f"... ({len(named) - shown - 1} more)", named[-1]]
        rates_text = "lr " + ", ".join(named)
    frozen_names = set(plan.frozen)
    frozen = [group for group, members in plan.layers if any(name in frozen_names for name, _ in members)]
    tied = " (the tied output head with it)" if model.lm_head is None and "model.embed_tokens" in frozen else ""
    return (f"{strategy} fine-tuning of {trained:,} of {model.num_parameters():,} parameters; {rates_text}"
            + (f"; frozen: {', '.join(frozen)}{tied}" if frozen else ""))


class TokenProgress:
    """The progress bar with tokens/s: it counts the real tokens (attention mask) of every batch
    the loss sees, and redraws after each optimizer step."""

    def __init__(self, enabled: bool, loss=causal_lm_loss_sum):
        self.enabled, self.loss, self.bar, self.tokens = enabled, loss, None, 0

    def start(self, total_steps) -> None:
        self.bar, self.started = ProgressBar(total_steps, enabled=self.enabled), time.perf_counter()

    def loss_fn(self, model, batch):
        self.tokens += int(np.asarray(batch["attention_mask"]).sum())
        return self.loss(model, batch)

    def on_step_end(self, trainer, record):
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(trainer.step, loss=record["loss"], **{"tokens/s": f"{rate:.0f}"})

    def close(self):
        self.bar.close()


def build_trainer(model, param_groups, config, loader, out: Path, loss=causal_lm_loss_sum):
    """(Trainer, progress): AdamW on ``param_groups``, the config's schedule, ``loss`` (a sum over
    the supervised tokens of a batch; default the causal-LM loss) divided by the supervised tokens
    of each whole step."""
    optimizer = AdamW(param_groups, lr=config.lr)
    progress = TokenProgress(config.progress and sys.stderr.isatty(), loss)

    def schedule(opt, total_steps):
        return schedule_by_name(config.schedule, opt, total_steps, config.warmup_ratio)

    trainer = Trainer(model, optimizer, loader, epochs=config.epochs or None, max_steps=config.max_steps or None,
                      accumulation_steps=config.accumulation, max_grad_norm=config.clip or None, schedule=schedule,
                      loss_fn=progress.loss_fn, count_fn=count_supervised, callbacks=[progress],
                      log_path=out / METRICS, log_every=config.log_every, progress=False)
    progress.start(trainer.total_steps)
    return trainer, progress


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
