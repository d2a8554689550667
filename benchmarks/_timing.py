"""Shared benchmark plumbing: equal BLAS threads for NumPy and PyTorch, medians, PyTorch detection.

Import this module first in every benchmark script: it pins the BLAS/OpenMP thread count
through the environment, which only takes effect before NumPy (and PyTorch) load.
``BENCH_THREADS`` chooses the count (default: every core). ``BENCH_KEEP_FREED=1`` makes glibc keep
freed memory for reuse (``tinysft.backend.keep_freed_memory``, what the ``tinysft`` command does); it
serves both libraries, which share the process. By default each library runs with glibc's defaults,
as a program that imports it would.
"""
import os
import sys

THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

import cProfile
import importlib
import io
import json
import platform
import pstats
import statistics
import subprocess
import tarfile
import tempfile
import time

# tinysft before NumPy, as in a program that imports it first (OpenBLAS's idle timeout, tinysft/__init__.py),
# and after the thread pinning above
from tinysft.backend import keep_freed_memory  # noqa: E402

import numpy as np  # noqa: E402

KEEP_FREED = os.environ.get("BENCH_KEEP_FREED", "0") == "1" and keep_freed_memory()


def load_torch():
    """PyTorch with the same thread count, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    return torch


def samples(fn, repeats=15, warmup=3, min_time=0.0):
    """Wall times of ``repeats`` runs of ``fn()`` after ``warmup`` runs, in seconds.

    With ``min_time`` each run repeats ``fn`` until at least that long has passed and
    counts the time per call (for calls of a few microseconds).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_time:
                break
        times.append(elapsed / calls)
    return times


def median_seconds(fn, repeats=15, warmup=3, min_time=0.0):
    """Median wall time of ``fn()``."""
    return statistics.median(samples(fn, repeats, warmup, min_time))


def compare(ours, theirs=None, repeats=15, warmup=2, rounds=3, min_time=0.0):
    """Medians of ``ours()`` and ``theirs()``, timed in alternating blocks (``rounds`` of each).

    Machines here are shared and noisy, so the two are interleaved to see the same load, and
    each block starts after a short pause: NumPy's OpenBLAS and PyTorch's OpenMP threads spin
    for a while after work and would otherwise steal the cores from the other library.
    Returns (ours, theirs) in seconds per call; theirs is None when there is no ``theirs``.
    """
    times = {"ours": [], "theirs": []}
    per_block = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            if fn is not None:
                time.sleep(0.2)
                times[name] += samples(fn, per_block, warmup, min_time)
    return statistics.median(times["ours"]), statistics.median(times["theirs"]) if theirs is not None else None


def compare_many(fns, repeats=15, warmup=2, rounds=3, min_time=0.0):
    """``compare`` for any number of callables: ``{name: fn}`` -> ``{name: median seconds}``.

    Same interleaving as ``compare`` (``rounds`` blocks of each, a pause before each block);
    ``None`` entries are skipped and come back as None.
    """
    times = {name: [] for name in fns}
    per_block = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            if fn is not None:
                time.sleep(0.2)
                times[name] += samples(fn, per_block, warmup, min_time)
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def header(title, torch):
    """Print what the figures depend on: machine, thread count, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# {title}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu}, {os.cpu_count()} cores; "
          f"BLAS/OpenMP threads = {THREADS} (numpy and torch); "
          f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', '(default)')}")
    versions = f"numpy {np.__version__}"
    versions += f", torch {torch.__version__} (threads {torch.get_num_threads()})" if torch else ", torch not installed"
    print(f"# {versions}; Python {platform.python_version()}; medians of repeats")
    print(f"# malloc: freed blocks {'kept for reuse (keep_freed_memory)' if KEEP_FREED else 'returned (glibc default)'}")
    if hasattr(os, "getloadavg"):  # other work on the machine makes every figure slower and noisier
        print(f"# load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def row(name, ours, theirs=None, unit="ms", scale=1e3, extra=""):
    """One result line: tinysft's time, PyTorch's and the ratio tinysft/PyTorch (> 1: slower)."""
    text = f"{name:<40} tinysft {ours * scale:10.3f} {unit}"
    if theirs is not None:
        text += f"   torch {theirs * scale:10.3f} {unit}   ratio {ours / theirs:6.2f}x"
    print(text + (f"   {extra}" if extra else ""), flush=True)


def profile(fn, steps: int, what: str, top: int = 15) -> None:
    """cProfile ``steps`` calls of ``fn`` and print the ``top`` functions by their own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    print(f"# cProfile of {steps} {what}, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def run_child(script: str, child_args: list, threads: int, what: str) -> dict:
    """Run ``script --child ...`` in a fresh process with ``BENCH_THREADS=threads`` and return the
    JSON it printed on its ``RESULT`` line; its other lines (a profile, if asked for) are echoed."""
    env = {**os.environ, "BENCH_THREADS": str(threads)}
    out = subprocess.run([sys.executable, os.path.abspath(script), "--child", *child_args],
                         env=env, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            print(line)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{what} at {threads} threads failed (exit {out.returncode})")
    return json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])


def engine_at(ref):
    """The tinysft package as of git commit ``ref``, imported beside the current one as
    ``tinysft_at_<ref>`` (the engine's modules import each other relatively, so the renamed
    copy is self-contained: its Tensor, its functional, its backend)."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "tinysft"], cwd=_ROOT, check=True,
                             capture_output=True).stdout
    folder = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # 3.11.4+
    name = f"tinysft_at_{ref}"
    os.rename(os.path.join(folder, "tinysft"), os.path.join(folder, name))
    sys.path.insert(0, folder)
    return importlib.import_module(name)
