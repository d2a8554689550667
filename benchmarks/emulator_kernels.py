"""For the record: how long the CPU emulator takes to run the kernels, next to the float64 NumPy reference.
The emulator runs every CUDA thread as a fiber; it exists for testing, not speed.

    python benchmarks/emulator_kernels.py
"""
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinysft.cuda.emulator import schedule  # noqa: E402
from tinysft.cuda.ops import clip, cross_entropy  # noqa: E402
from tinysft.cuda.ops.clip import clip_grad_norm  # noqa: E402
from tinysft.cuda.ops.cross_entropy import ce_block_size, softmax_cross_entropy  # noqa: E402


def best_ms(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    if shutil.which("g++") is None:
        print("emulator_kernels.py: g++ is required to build the emulator; nothing to do.")
        return 0
    softmax_cross_entropy(np.zeros((1, 1), np.float32), np.zeros(1, np.int64))  # build before timing
    clip_grad_norm([np.ones(1, np.float32)], 1.0)
    print(f"{'case':36s} {'emulator':>10s} {'reference':>10s} {'greedy':>10s}")
    for n, v, block in [(8, 1000, 64), (64, 1000, 256), (4, 32000, None), (2, 50257, None)]:
        x, t = cross_entropy.make_input(n, v)
        emu = best_ms(lambda: softmax_cross_entropy(x, t, block_size=block))
        ref = best_ms(lambda: cross_entropy.reference(x, t))
        with schedule("greedy"):
            greedy = best_ms(lambda: softmax_cross_entropy(x, t, block_size=block))
        label = f"cross-entropy N={n} V={v} block={block or ce_block_size(v)}"
        print(f"{label:36s} {emu:8.1f}ms {ref:8.1f}ms {greedy:8.1f}ms")
    for total in (10_000, 1_000_000, 4_000_000):
        grads = clip.make_input([(total // 4,), (total // 4 + 3,), (total // 2 - 3,)])
        emu = best_ms(lambda: clip_grad_norm(grads, 1e9))
        ref = best_ms(lambda: clip.reference(grads, 1e9))
        with schedule("greedy"):
            greedy = best_ms(lambda: clip_grad_norm(grads, 1e9))
        print(f"{'clip_grad_norm ' + f'{total:,} floats':36s} {emu:8.1f}ms {ref:8.1f}ms {greedy:8.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
