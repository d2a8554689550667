"""Data parallel on one machine: 2 MPI ranks × 1 thread against 1 process × 2 threads, same global batch.

    python3 benchmarks/bench_distributed.py                       # both models
    python3 benchmarks/bench_distributed.py --models minilm --steps 6

Two steps, each a ``tinysft.finetune.Trainer`` step (forward, loss, backward, the
all-reduce, clipping at 1.0, AdamW):
  minilm   a MiniLM-L6-shaped BERT classifier (random init, 22.7M parameters, all trained),
           global batch 32 × 40 tokens (random lengths in [20, 40]), 26 labels
  smollm2  SmolLM2-135M-Instruct from the packaged GGUF with LoRA r = 16 on all seven
           projections (only the adapters train), global batch 8 × 128 tokens, labels from
           position 32 on (the causal-LM SFT loss, counted over the supervised tokens)
Each configuration runs in its own launch (``mpirun -n 2`` with one BLAS thread per rank,
or one process with two), so the thread counts are pinned before NumPy loads. Reported per
configuration: the median step of the timed steps after a first one, on rank 0; the time
rank 0 spent inside ``tinysft.distributed.all_reduce`` (the count, the loss and the
gradients) and its share of the step, with the wait for the slower rank timed apart (a
barrier before each all-reduce, added for the measurement); the bytes that one rank
hands to the all-reduce per step (the gradient bucket and the few numbers) against the
model's size.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import _timing  # first: pins BLAS threads before NumPy loads

MODELS = ("minilm", "smollm2")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def minilm_setup(world, rank):
    import numpy as np

    from bench_finetune_step import CONFIG, NUM_LABELS, batch
    from tinysft.data import ArrayDataset, DataLoader
    from tinysft.models import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(**CONFIG), num_labels=NUM_LABELS)
    ids, mask, labels = batch(32 * 8, 40, CONFIG["vocab_size"])
    data = ArrayDataset({"input_ids": ids, "attention_mask": mask, "labels": labels})
    loader = DataLoader(data, 32 // world, seed=0, num_replicas=world, rank=rank)
    return model, loader, {}, np


def smollm2_setup(world, rank):
    import numpy as np

    from bench_sft_step import PROMPT_TOKENS, SHAPE
    from tinysft.data import ArrayDataset, DataLoader
    from tinysft.finetune.causal_lm import causal_lm_loss_sum, count_supervised
    from tinysft.models import LlamaForCausalLM
    from tinysft.nn.lora import apply_lora

    model = LlamaForCausalLM.from_pretrained().train()
    apply_lora(model, r=16, alpha=32, dropout=0.05, target_modules=TARGETS)
    b, t = SHAPE
    rng = np.random.default_rng(0)
    n = b * 8
    lengths = np.concatenate([[t], rng.integers(96, t + 1, n - 1)])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, 49152, (n, t)), 2)
    labels = np.where((mask == 1) & (np.arange(t)[None, :] >= PROMPT_TOKENS), ids, -100)
    data = ArrayDataset({"input_ids": ids, "attention_mask": mask, "labels": labels})
    loader = DataLoader(data, b // world, seed=0, num_replicas=world, rank=rank)
    return model, loader, {"loss_fn": causal_lm_loss_sum, "count_fn": count_supervised}, np


def child(model_name, steps):
    """One launch: ``steps`` Trainer steps; rank 0 prints a RESULT line."""
    import tinysft
    from tinysft import distributed as dist
    from tinysft.finetune import Trainer
    from tinysft.optim import AdamW

    rank, world = dist.init()
    tinysft.manual_seed(0)
    model, loader, fns, np = (minilm_setup if model_name == "minilm" else smollm2_setup)(world, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=1e-4, weight_decay=0.01)

    wait_seconds, reduce_seconds, reduce_bytes = [0.0], [0.0], [0]
    plain = dist.all_reduce

    def timed_all_reduce(arrays, what="all_reduce"):
        """A barrier first (the wait for the slower rank, timed apart), then the sum itself."""
        arrays = list(arrays)
        started = time.perf_counter()
        dist.barrier()
        arrived = time.perf_counter()
        plain(arrays, what)
        wait_seconds[0] += arrived - started
        reduce_seconds[0] += time.perf_counter() - arrived
        reduce_bytes[0] += sum(a.nbytes for a in arrays) if world > 1 else 0

    dist.all_reduce = timed_all_reduce  # the Trainer and all_reduce_sum call it through the module
    records = []

    class Clock:
        def __init__(self):
            self.last = None

        def on_step_end(self, trainer, record):
            now = time.perf_counter()
            if self.last is not None:
                records.append((now - self.last, reduce_seconds[0], reduce_bytes[0], wait_seconds[0]))
            self.last = now
            wait_seconds[0], reduce_seconds[0], reduce_bytes[0] = 0.0, 0.0, 0

    trainer = Trainer(model, optimizer, loader, max_steps=steps, max_grad_norm=1.0, callbacks=[Clock()],
                      progress=False, **fns)
    load = os.getloadavg()[0]
    trainer.fit()
    if rank == 0:
        step = statistics.median(r[0] for r in records)
        reduce = statistics.median(r[1] for r in records)
        wait = statistics.median(r[3] for r in records)
        print("RESULT " + json.dumps({
            "world": world, "threads": _timing.THREADS, "step_s": step, "all_reduce_s": reduce, "wait_s": wait,
            "bytes_per_step": max(r[2] for r in records), "load": load,
            "model_bytes": int(sum(p.data.nbytes for p in model.parameters())),
            "trainable_bytes": int(sum(p.data.nbytes for p in trainable)), "steps": len(records)}), flush=True)


def launch(model_name, ranks, threads, steps):
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [sys.executable, os.path.abspath(__file__), "--child", model_name, "--steps", str(steps)]
    if ranks > 1:
        mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
        if mpirun is None:
            raise SystemExit("mpirun not found: pip install 'tinysft[mpi]'")
        command = [mpirun, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"] + command
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
        raise SystemExit(f"{model_name} with {ranks} ranks × {threads} threads failed (exit {out.returncode})")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, default=4, help="steps per launch; the first is not timed")
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    _timing.header("bench_distributed: 2 MPI ranks × 1 thread vs 1 process × 2 threads, same global batch", None)
    print(f"# uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for model_name in args.models:
        one = launch(model_name, 1, 2, args.steps)
        two = launch(model_name, 2, 1, args.steps)
        for r in (one, two):
            share = r["all_reduce_s"] / r["step_s"]
            print(f"{model_name:<8} {r['world']} rank(s) × {r['threads']} thread(s): step {r['step_s']:7.3f} s   "
                  f"all-reduce {r['all_reduce_s']:.3f} s ({share:5.1%}), waiting for the other rank "
                  f"{r['wait_s']:.3f} s   sent/step {r['bytes_per_step'] / 2**20:8.2f} "
                  f"MiB of a {r['model_bytes'] / 2**20:.1f} MiB model ({r['trainable_bytes'] / 2**20:.2f} MiB "
                  f"trained)   load at start {r['load']:.1f}", flush=True)
        print(f"{model_name:<8} speed-up of 2 ranks over 2 threads: {one['step_s'] / two['step_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
