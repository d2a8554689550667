"""benchmarks/gpu_check.sh, as far as a machine without a GPU can run it: it must fail loudly here, pick
exactly the GPU tests for its step 1, and its step 4 (MiniLM and SmolLM2 steps on two devices) must run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinysft.backend import cuda_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHON=sys.executable, **env))


@pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is here: the script would run the whole check")
def test_fails_loudly_without_a_gpu(tmp_path):
    log = tmp_path / "gpu_check.log"
    result = run([str(log)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAILED: no CUDA GPU" in result.stderr
    text = log.read_text()
    assert "FAILED:" in text and "nothing was run" in text and "===== step" not in text
    assert re.search(r"^  cupy +\S", text, re.M), text  # the environment report names what is missing


def test_needs_a_log_path():
    result = run([])
    assert result.returncode == 2 and "give the log file" in result.stderr


def test_step_1_selects_the_tests_that_skip_for_want_of_a_gpu():
    """Run here with the script's selection, every selected test skips for "no CUDA GPU" (and some exist)."""
    env = dict(os.environ, TINYSFT_GPU_TESTS_ONLY="1", HYPOTHESIS_PROFILE="ci",
               PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-q", "-rs",
                             "tests/core", "tests/cuda/test_cuda_cupy.py"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    out = result.stdout
    summary = out.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", out, re.M)
    if cuda_available():
        pytest.skip("a CUDA GPU is here: the selected tests run instead of skipping")
    assert "passed" not in summary and "failed" not in summary and "error" not in summary, out[-3000:]
    assert skipped > len(re.findall(r"def test_", (ROOT / "tests/cuda/test_cuda_cupy.py").read_text())), out[-3000:]
    assert all("no CUDA GPU" in why for _, why in reasons) and sum(int(n) for n, _ in reasons) == skipped, out[-3000:]
    assert "deselected" in summary  # the CPU variants of the same tests were dropped


def test_step_4_trains_the_same_steps_on_two_devices():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--model-steps",
                             "--devices", "cpu,cpu", "--tiny"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    losses = re.findall(r"^  cpu : losses (.*);", result.stdout, re.M)
    assert len(losses) == 4 and losses[0] == losses[1] and losses[2] == losses[3], result.stdout
    assert all(len(row.split(", ")) == 3 for row in losses) and losses[0] != losses[2], result.stdout
    for label in ("MiniLM-L6 classification", "SmolLM2 SFT"):
        assert f"PASS: {label} largest relative loss difference cpu vs cpu 0.00e+00" in result.stdout
