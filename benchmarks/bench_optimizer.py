"""AdamW step and global-norm clipping over MiniLM-L6-shaped parameters, against PyTorch CPU in the same run.

    python3 benchmarks/bench_optimizer.py            # BENCH_THREADS=1 to pin one thread
    python3 benchmarks/bench_optimizer.py --profile 5   # also cProfile 5 tinysft AdamW steps
    python3 benchmarks/bench_optimizer.py --ref 9f47f3e  # also time the optimizer as of a git commit

The 101 float32 tensors of all-MiniLM-L6-v2 without its pooler (22,565,376 numbers): word
embeddings 30522×384, positions 512×384, token types 2×384, the embedding LayerNorm, and per
layer Q, K, V, O (384×384 + 384 each), FFN 1536×384 + 1536 and 384×1536 + 384, two LayerNorms.
Gradients are random normal × 1e-2, fixed across steps.

1. AdamW step (lr 1e-3, weight decay 0.01): ``tinysft.optim.AdamW`` against ``torch.optim.AdamW``
   with its default (a per-tensor loop on the CPU), ``foreach=True`` and ``fused=True``.
2. ``tinysft.optim.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_`` (its defaults): the
   total 2-norm and the in-place scaling. Each call lowers ``max_norm`` by 0.1% so that both libraries
   really scale every time (tinysft skips the pass when nothing needs clipping). Then the relative error
   of each library's total norm (on the original gradients) against a float64 reference.

With ``--ref``, each is also timed as of that commit, interleaved with the current code.
"""
import argparse
import importlib
import math

import _timing  # first: pins BLAS threads before NumPy loads
import numpy as np

from tinysft.nn import Parameter
from tinysft.optim import AdamW, clip_grad_norm_

torch = _timing.load_torch()
D, FFN, VOCAB, POSITIONS, TYPES, LAYERS = 384, 1536, 30522, 512, 2, 6
LR = 1e-3


def minilm_shapes():
    """Parameter shapes of all-MiniLM-L6-v2 (no pooler), in checkpoint order."""
    shapes = [(VOCAB, D), (POSITIONS, D), (TYPES, D), (D,), (D,)]
    for _ in range(LAYERS):
        shapes += [(D, D), (D,)] * 4 + [(D,), (D,)]  # Q, K, V, attention output; its LayerNorm
        shapes += [(FFN, D), (FFN,), (D, FFN), (D,), (D,), (D,)]  # intermediate, output; its LayerNorm
    return shapes


def make(seed=0):
    """Parameter values and gradients (float32 arrays), and tinysft parameters holding copies."""
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s, dtype=np.float32) * 0.05 for s in minilm_shapes()]
    grads = [rng.standard_normal(s, dtype=np.float32) * 1e-2 for s in minilm_shapes()]
    return values, grads


def tinysft_params(values, grads, engine=None):
    params = [(engine.nn.Parameter if engine else Parameter)(v.copy()) for v in values]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    return params


def torch_params(values, grads):
    params = [torch.tensor(v, requires_grad=True) for v in values]  # torch.tensor copies
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def then_and_now(what, old_fn, new_fn, ref, repeats):
    """Time ``old_fn`` (the code as of ``ref``) against ``new_fn``, interleaved, and print the speed-up."""
    old_s, now_s = _timing.compare(old_fn, new_fn, repeats=repeats)
    print(f"{'':<40} {what} as of {ref}: {old_s * 1e3:.3f} ms, now {now_s * 1e3:.3f} ms ({old_s / now_s:.2f}x faster)")


def bench_adamw(values, grads, repeats, old=None, ref=None):
    params = tinysft_params(values, grads)
    ours = AdamW(params, lr=LR)
    fns = {"tinysft": ours.step}
    if torch:
        for name, options in (("torch default", {}), ("torch foreach=True", {"foreach": True}),
                              ("torch fused=True", {"fused": True})):
            fns[name] = torch.optim.AdamW(torch_params(values, grads), lr=LR, **options).step
    times = _timing.compare_many(fns, repeats=repeats)
    for name, theirs in times.items():
        if name != "tinysft":
            _timing.row(f"AdamW step, {name}", times["tinysft"], theirs)
    if not torch:
        _timing.row("AdamW step", times["tinysft"])
    elements = sum(v.size for v in values)
    # an AdamW step reads θ, g, m, v and writes θ, m, v: 7 × 4 bytes per element at the least
    print(f"{'':<40} tinysft moves ≥ {7 * 4 * elements / times['tinysft'] / 1e9:.1f} GB/s "
          f"(7 float32 reads/writes per element)")
    if old is not None:
        then_and_now("AdamW step", old.optim.AdamW(tinysft_params(values, grads, old), lr=LR).step, ours.step,
                     ref, repeats)


def clipping(clip, params, norm):
    """A call of ``clip(params, max_norm)`` that lowers ``max_norm`` (from 0.999 · ``norm``) by 0.1% each time."""
    budget = [norm * 0.999]

    def call():
        clip(params, budget[0])
        budget[0] *= 0.999
    return call


def bench_clip(values, grads, repeats, old=None, ref=None):
    params = tinysft_params(values, grads)
    reference = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))
                              for g in grads))
    ours_norm = clip_grad_norm_(params, math.inf)  # nothing is scaled with an infinite max_norm
    ours = clipping(clip_grad_norm_, params, ours_norm)
    theirs = theirs_norm = None
    if torch:
        tparams = torch_params(values, grads)
        theirs_norm = float(torch.nn.utils.clip_grad_norm_(tparams, math.inf))  # scales by 1
        theirs = clipping(torch.nn.utils.clip_grad_norm_, tparams, theirs_norm)

    ours_s, theirs_s = _timing.compare(ours, theirs, repeats=repeats)
    _timing.row("clip_grad_norm_ (norm + scale)", ours_s, theirs_s)
    text = f"{'':<40} total-norm relative error vs float64: tinysft {(ours_norm - reference) / reference:+.1e}"
    if torch:
        text += f", torch {(theirs_norm - reference) / reference:+.1e}"
    print(text)
    if old is not None:
        old_params = tinysft_params(values, grads, old)
        then_and_now("clip_grad_norm_", clipping(old.optim.clip_grad_norm_, old_params, ours_norm), ours,
                     ref, repeats)


def profile(values, grads, steps, top=15):
    optimizer = AdamW(tinysft_params(values, grads), lr=LR)
    optimizer.step()  # state allocated
    _timing.profile(optimizer.step, steps, "tinysft AdamW steps", top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant (default 15)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="afterwards, cProfile this many tinysft AdamW steps")
    parser.add_argument("--ref", help="also time the optimizer and clipping as of this git commit")
    args = parser.parse_args()
    _timing.header("bench_optimizer: AdamW and clip_grad_norm_ over MiniLM-L6-shaped parameters, "
                   "tinysft vs PyTorch CPU (ratio = tinysft time / torch time)", torch)
    values, grads = make()
    print(f"# {len(values)} float32 tensors, {sum(v.size for v in values):,} numbers")
    old = _timing.engine_at(args.ref) if args.ref else None
    if old:
        for module in ("nn", "optim"):  # old.nn, old.optim
            importlib.import_module(f"{old.__name__}.{module}")
    bench_adamw(values, grads, args.repeats, old, args.ref)
    bench_clip(values, grads, args.repeats, old, args.ref)
    if args.profile:
        profile(values, grads, args.profile)
