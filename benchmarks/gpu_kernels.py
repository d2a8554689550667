"""GPU check and timing of the kernels in csrc/ (needs CuPy and a CUDA device; exits 0 with a message otherwise).

1. Correctness: every case of tinysft/cuda/checks.py through cupy.RawModule against the float64 reference.
2. Optionally (--sanitizer) the correctness run again under compute-sanitizer memcheck, racecheck, synccheck.
3. Timing with CUDA events (warm-up, median of --iters) at the cross-entropy shapes (8192, 50304),
   (4096, 32000), (512, 30522) and global-norm clipping over MiniLM-L6 parameter shapes (22.7M floats),
   against a CuPy composition and torch (F.cross_entropy fwd+bwd, clip_grad_norm_) when torch has CUDA.
   Achieved bandwidth counts the minimum bytes each operation must move (CE: read logits, write dlogits;
   clip: read grads, then read and write them to scale), as GB/s and as a fraction of a measured
   device-to-device copy.

    python benchmarks/gpu_kernels.py [--sanitizer] [--iters 50] [--correctness-only]
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinysft.cuda import checks, is_cupy_available  # noqa: E402
from tinysft.cuda.kernels import clip_grad_norm, softmax_cross_entropy  # noqa: E402

CE_SHAPES = [(8192, 50304), (4096, 32000), (512, 30522)]


def minilm_shapes(vocab=30522, hidden=384, layers=6, ffn=1536, positions=512):
    """Parameter shapes of a MiniLM-L6 (BERT) encoder with pooler: 22.7M floats."""
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,)] * 4  # two LayerNorms
    return shapes + [(hidden, hidden), (hidden,)]


def time_gpu(fn, iters, warmup=5):
    """Median milliseconds of fn() between CUDA events."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def copy_bandwidth(iters):
    """Device-to-device copy GB/s (read + write) on 1 GiB."""
    import cupy

    src = cupy.ones(1 << 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    ms = time_gpu(lambda: dst.__setitem__(Ellipsis, src), iters)
    return 2 * src.nbytes / ms / 1e6


def torch_cuda():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def cupy_cross_entropy(x, t, scale):
    """The unfused composition: log-softmax with the max shift, loss rows, and the gradient."""
    import cupy

    m = x.max(axis=1, keepdims=True)
    e = cupy.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    lse = m[:, 0] + cupy.log(s[:, 0])
    rows = cupy.arange(x.shape[0])
    loss = lse - x[rows, t]
    grad = e / s
    grad[rows, t] -= 1.0
    grad *= scale
    return loss, grad


def report(label, ms, nbytes, copy_gbs):
    gbs = nbytes / ms / 1e6
    print(f"  {label:34s} {ms:8.3f} ms  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.0%} of copy")


def bench_cross_entropy(iters, copy_gbs):
    import cupy

    torch = torch_cuda()
    for n, v in CE_SHAPES:
        rng = cupy.random.default_rng(0)
        x = rng.standard_normal((n, v), dtype=cupy.float32) * 3
        t = rng.integers(0, v, n)
        nbytes = 2 * x.nbytes
        print(f"cross-entropy fwd+bwd N={n} V={v} ({x.nbytes / 2**20:.0f} MiB logits)")
        report("tinysft fused kernel", time_gpu(lambda: softmax_cross_entropy(x, t), iters), nbytes, copy_gbs)
        report("tinysft fused kernel, in place",
               time_gpu(lambda: softmax_cross_entropy(x, t, in_place=True), iters), nbytes, copy_gbs)
        report("CuPy composition", time_gpu(lambda: cupy_cross_entropy(x, t, 1.0 / n), iters), nbytes, copy_gbs)
        if torch is not None:
            xt = torch.as_tensor(x, device="cuda").requires_grad_()
            tt = torch.as_tensor(t, device="cuda")

            def torch_step():
                xt.grad = None
                torch.nn.functional.cross_entropy(xt, tt).backward()

            report("torch F.cross_entropy fwd+bwd", time_gpu(torch_step, iters), nbytes, copy_gbs)


def bench_clip(iters, copy_gbs):
    import cupy

    shapes = minilm_shapes()
    rng = cupy.random.default_rng(0)
    grads = [rng.standard_normal(s, dtype=cupy.float32) for s in shapes]
    total = sum(g.size for g in grads)
    nbytes = 3 * 4 * total  # read for the norm, then read + write to scale
    print(f"clip_grad_norm over MiniLM-L6 shapes: {len(shapes)} tensors, {total / 1e6:.1f}M floats")
    report("tinysft multi-tensor kernels", time_gpu(lambda: clip_grad_norm(grads, 1e-3), iters), nbytes, copy_gbs)

    def cupy_clip():
        norm = cupy.sqrt(sum(cupy.sum(g * g, dtype=cupy.float64) for g in grads))
        coef = cupy.minimum(1.0, 1e-3 / (norm + 1e-6)).astype(cupy.float32)
        for g in grads:
            g *= coef

    report("CuPy composition", time_gpu(cupy_clip, iters), nbytes, copy_gbs)
    torch = torch_cuda()
    if torch is not None:
        params = [torch.nn.Parameter(torch.as_tensor(g, device="cuda")) for g in grads]
        for p in params:
            p.grad = p.detach().clone()
        report("torch clip_grad_norm_ (foreach)",
               time_gpu(lambda: torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True), iters), nbytes, copy_gbs)


def run_sanitizer():
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        print("compute-sanitizer not on PATH: skipped")
        return 0
    status = 0
    for check in ("memcheck", "racecheck", "synccheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, __file__, "--correctness-only"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        summary = [l for l in result.stdout.splitlines() if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l]
        print(f"compute-sanitizer {check}: exit {result.returncode} {' '.join(summary)}")
        status |= result.returncode
    return status


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sanitizer", action="store_true", help="also run compute-sanitizer memcheck/racecheck/synccheck")
    p.add_argument("--correctness-only", action="store_true")
    args = p.parse_args()
    if not is_cupy_available():
        print("gpu_kernels.py: CuPy with a CUDA device is required; nothing to do.")
        return 0
    print("correctness (cupy.RawModule vs float64 reference):")
    failures = checks.run_all("cupy")
    if args.correctness_only:
        return 1 if failures else 0
    if args.sanitizer:
        failures += run_sanitizer()
    copy_gbs = copy_bandwidth(args.iters)
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s")
    bench_cross_entropy(args.iters, copy_gbs)
    bench_clip(args.iters, copy_gbs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
