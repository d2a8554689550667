"""Autograd cost against PyTorch CPU in the same run: per-op overhead, a big matmul, an MLP step.

    python3 benchmarks/bench_autograd.py            # BENCH_THREADS=1 to pin one thread

1. a chain of 1,000 adds on a 4-element tensor, forward + backward, per op (pure overhead);
2. float32 matmul 1024³, forward + backward (three GEMMs), with GFLOP/s;
3. an MLP 784-512-512-10 (ReLU, cross-entropy), batch 128: forward, backward and a plain
   SGD update, the same hand-written step in both libraries (tinysft.nn is not used).
"""
import itertools

import _timing  # first: pins BLAS threads before NumPy loads
import numpy as np

import tinysft
from tinysft import functional as F
from tinysft import optim

torch = _timing.load_torch()
CHAIN = 1000


def chain_tinysft():
    a = tinysft.tensor(np.ones(4, dtype=np.float32), requires_grad=True)
    x = a
    for _ in range(CHAIN):
        x = x + a
    x.sum().backward()


def chain_torch():
    a = torch.ones(4, requires_grad=True)
    x = a
    for _ in range(CHAIN):
        x = x + a
    x.sum().backward()


def bench_chain():
    ours, theirs = _timing.compare(chain_tinysft, chain_torch if torch else None, repeats=15)
    ours, theirs = ours / CHAIN, theirs / CHAIN if theirs else None
    _timing.row(f"chain of {CHAIN} adds, fwd+bwd per op", ours, theirs, unit="µs", scale=1e6)


def bench_matmul(n=1024):
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a, b = tinysft.tensor(a_np, requires_grad=True), tinysft.tensor(b_np, requires_grad=True)
    upstream = np.ones((n, n), dtype=np.float32)

    def ours_step():
        a.grad = b.grad = None
        (a @ b).backward(upstream)

    flops = 3 * 2 * n ** 3
    torch_step = None
    if torch:
        ta, tb = torch.from_numpy(a_np).requires_grad_(), torch.from_numpy(b_np).requires_grad_()
        tup = torch.from_numpy(upstream)

        def torch_step():
            ta.grad = tb.grad = None
            (ta @ tb).backward(tup)

    ours, theirs = _timing.compare(ours_step, torch_step, repeats=9)
    extra = f"tinysft {flops / ours / 1e9:.0f} GFLOP/s" + (f", torch {flops / theirs / 1e9:.0f} GFLOP/s" if theirs else "")
    _timing.row(f"matmul {n}³ float32 fwd+bwd", ours, theirs, extra=extra)


def bench_mlp(optimizer="adam", batch=128, sizes=(784, 512, 512, 10), lr=1e-3):
    """One training step (forward, cross-entropy, backward, optimizer step) with each library's own
    optimizer: ``optimizer`` "adam" (tinysft.optim.Adam vs torch.optim.Adam) or "sgd"."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((i, o)) * np.sqrt(2.0 / i)).astype(np.float32) for i, o in itertools.pairwise(sizes)]
    biases = [np.zeros(o, dtype=np.float32) for o in sizes[1:]]
    x_np = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    y_np = rng.integers(0, sizes[-1], batch)

    def mlp(params, h, relu):
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = relu(h)
        return h

    params = [tinysft.tensor(p.copy(), requires_grad=True) for pair in zip(weights, biases) for p in pair]
    x, y = tinysft.tensor(x_np), tinysft.tensor(y_np)
    opt = {"adam": optim.Adam, "sgd": optim.SGD}[optimizer](params, lr=lr)

    def ours_step():
        opt.zero_grad()
        F.cross_entropy(mlp(params, x, lambda h: h.relu()), y).backward()
        opt.step()

    torch_step = None
    if torch:
        tparams = [torch.tensor(p.copy(), requires_grad=True) for pair in zip(weights, biases) for p in pair]
        tx, ty = torch.from_numpy(x_np), torch.from_numpy(y_np)
        topt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](tparams, lr=lr)

        def torch_step():
            topt.zero_grad()
            torch.nn.functional.cross_entropy(mlp(tparams, tx, torch.relu), ty).backward()
            topt.step()

    ours, theirs = _timing.compare(ours_step, torch_step, repeats=21)
    _timing.row(f"MLP {'-'.join(map(str, sizes))} b{batch} {optimizer.upper() if optimizer == 'sgd' else 'Adam'} step",
                ours, theirs)


if __name__ == "__main__":
    _timing.header("bench_autograd: tinysft vs PyTorch CPU (ratio = tinysft time / torch time)", torch)
    bench_chain()
    bench_matmul()
    bench_mlp("adam")
    bench_mlp("sgd")
