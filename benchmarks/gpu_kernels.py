"""GPU check and timing of every kernel in tinysft.cuda.ops.OPS (needs CuPy and a CUDA device).

1. --check: every registered case through cupy.RawModule against the float64 reference.
2. --sanitizer: the --check run again under compute-sanitizer memcheck, racecheck and synccheck.
3. --timing: each op's timing cases (`bench_cases`: fused cross-entropy at 8192x50304 and 4096x49152,
   global-norm clipping over MiniLM-L6 and SmolLM2-135M parameter shapes) with CUDA events (warm-up,
   median of --iters), beside PyTorch's own op on the same arrays where torch has CUDA
   (F.cross_entropy forward+backward, clip_grad_norm_(foreach=True)). Achieved bandwidth counts the
   least traffic each operation needs (stated by the op), as GB/s and as a fraction of a
   device-to-device copy measured in the same run.

With no flag all three run. Without a GPU it exits 2 with a message.

    python benchmarks/gpu_kernels.py [--check] [--sanitizer] [--timing] [--iters 50]
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinysft.backend import cuda_available  # noqa: E402
from tinysft.cuda import checks  # noqa: E402
from tinysft.cuda.ops import OPS  # noqa: E402


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
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# PyTorch's counterpart of an op, on the same inputs as its BenchCase: op NAME -> builder(torch, inputs) -> fn
def torch_cross_entropy(torch, inputs):
    logits = torch.as_tensor(inputs["logits"], device="cuda").requires_grad_()
    targets = torch.as_tensor(inputs["targets"], device="cuda")

    def step():
        logits.grad = None
        torch.nn.functional.cross_entropy(logits, targets).backward()
    return step


def torch_clip(torch, inputs):
    params = [torch.nn.Parameter(torch.as_tensor(g, device="cuda")) for g in inputs["grads"]]
    for p in params:
        p.grad = p.detach().clone()
    return lambda: torch.nn.utils.clip_grad_norm_(params, inputs["max_norm"], foreach=True)


TORCH_BASELINES = {"ce": ("torch F.cross_entropy fwd+bwd", torch_cross_entropy),
                   "clip": ("torch clip_grad_norm_ (foreach)", torch_clip)}


def report(label, ms, nbytes, copy_gbs):
    gbs = nbytes / ms / 1e6
    print(f"  {label:40s} {ms:8.3f} ms  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.0%} of copy", flush=True)
    return gbs


def bench(iters):
    import cupy

    copy_gbs = copy_bandwidth(iters)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (1 GiB, read + write)")
    torch = torch_cuda()
    if torch is None:
        print("torch with CUDA not found: no PyTorch baselines")
    summary = []
    for op in OPS:
        for case in op.bench_cases(cupy):
            print(f"{case.label} ({case.nbytes / 2**20:.0f} MiB of least traffic)")
            ms = time_gpu(case.run, iters)
            gbs = report("tinysft", ms, case.nbytes, copy_gbs)
            line = f"{case.label}: {gbs / copy_gbs:.0%} of copy"
            if torch is not None and op.NAME in TORCH_BASELINES:
                label, build = TORCH_BASELINES[op.NAME]
                torch_ms = time_gpu(build(torch, case.inputs), iters)
                report(label, torch_ms, case.nbytes, copy_gbs)
                line += f", {torch_ms / ms:.2f}x PyTorch's speed"
            summary.append(line)
            del case
            cupy.get_default_memory_pool().free_all_blocks()
    print("summary:")
    for line in summary:
        print("  " + line)


def run_sanitizer():
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        print("compute-sanitizer not on PATH: FAILED (cannot run the sanitizer passes)")
        return 1
    status = 0
    for check in ("memcheck", "racecheck", "synccheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, __file__, "--check"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        summary = [line for line in result.stdout.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        print(f"compute-sanitizer {check}: exit {result.returncode} {' '.join(summary)}", flush=True)
        if result.returncode:
            print(result.stdout[-4000:] + result.stderr[-4000:])
        status |= result.returncode
    return status


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="correctness cases on the GPU")
    p.add_argument("--sanitizer", action="store_true", help="the cases under compute-sanitizer")
    p.add_argument("--timing", action="store_true", help="timings beside the copy bandwidth and PyTorch")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    if not (args.check or args.sanitizer or args.timing):
        args.check = args.sanitizer = args.timing = True
    if not cuda_available():
        print("gpu_kernels.py: CuPy with a CUDA device is required (cupy missing or no GPU visible)", file=sys.stderr)
        return 2
    failures = 0
    if args.check:
        print("correctness (cupy.RawModule vs float64 reference):", flush=True)
        failures += checks.run_all("cupy")
    if args.sanitizer:
        failures += run_sanitizer()
    if args.timing:
        bench(args.iters)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
