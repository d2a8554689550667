"""backend.keep_freed_memory: with it, a freed 64 MiB buffer is reused by the next allocation
instead of faulting in fresh pages (run in a child process: the setting is process-wide)."""
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import numpy as np
from tinysft.backend import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(6):
    before = faults()
    buffer = np.empty(16 << 20, np.float32)  # 64 MiB
    buffer[:] = 1.0
    del buffer
    counts.append(faults() - before)
print(min(counts[1:]))
"""


def faults_per_buffer(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory sets glibc's malloc (Linux)")
def test_freed_buffers_are_reused():
    default, kept = faults_per_buffer("default"), faults_per_buffer("keep")
    assert default >= 32  # a fresh mmap: 64 MiB of untouched pages (in 2 MiB huge pages at best: 32 faults)
    assert kept < default / 4
