"""Cross-entropy forward + backward against PyTorch CPU's F.cross_entropy, in the same run.

    python3 benchmarks/bench_cross_entropy.py       # BENCH_THREADS=1 to pin one thread
    python3 benchmarks/bench_cross_entropy.py --ref 511f5b4   # also time the engine as of a git commit

float32 logits [N, C] (BERT's 30522-word vocabulary, ImageNet's 1000 classes, GPT-2's 50257,
and a small-class case), random targets, mean reduction; the logits' gradient is cleared
between calls in both libraries. Each case first checks that the two agree. Each line ends
with the minor page faults per call of each library (fresh large buffers fault on first write).
"""
import argparse
import resource

import _timing  # first: pins BLAS threads before NumPy loads
import numpy as np

import tinysft
from tinysft import functional as F

torch = _timing.load_torch()
CASES = [(512, 30522), (4096, 1000), (64, 50257), (8192, 32)]


def faults_per_call(fn, calls=5):
    """Minor page faults of this process per call of ``fn()`` (after one warm-up call)."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls)


def bench(rows, classes, repeats=15, old=None, ref=None):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes), dtype=np.float32) * 2
    target = rng.integers(0, classes, rows)
    x, y = tinysft.tensor(logits, requires_grad=True), tinysft.tensor(target)

    def ours():
        x.grad = None
        F.cross_entropy(x, y).backward()

    torch_step = None
    if torch:
        tx, ty = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(target)

        def torch_step():
            tx.grad = None
            torch.nn.functional.cross_entropy(tx, ty).backward()

        ours(), torch_step()  # the same loss and gradient first
        loss = F.cross_entropy(x, y).item()
        assert abs(loss - torch.nn.functional.cross_entropy(tx, ty).item()) < 1e-4 * abs(loss)
        assert np.abs(x.grad - tx.grad.numpy()).max() < 1e-6
    ours_s, theirs_s = _timing.compare(ours, torch_step, repeats=repeats)
    faults = f"page faults/call: tinysft {faults_per_call(ours)}" + (f", torch {faults_per_call(torch_step)}" if torch else "")
    _timing.row(f"cross_entropy {rows}x{classes} fwd+bwd", ours_s, theirs_s, extra=faults)
    if old is not None:
        old_x, old_y = old.tensor(logits, requires_grad=True), old.tensor(target)

        def old_step():
            old_x.grad = None
            old.functional.cross_entropy(old_x, old_y).backward()

        old_s, now_s = _timing.compare(old_step, ours, repeats=repeats)
        print(f"{'':<40} as of {ref}: {old_s * 1e3:.3f} ms, now {now_s * 1e3:.3f} ms ({old_s / now_s:.2f}x faster)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", help="also time the engine (tensor.py, functional.py, ...) as of this git commit")
    args = parser.parse_args()
    _timing.header("bench_cross_entropy: tinysft vs PyTorch CPU (ratio = tinysft time / torch time)", torch)
    old = _timing.engine_at(args.ref) if args.ref else None
    for rows, classes in CASES:
        bench(rows, classes, old=old, ref=args.ref)
