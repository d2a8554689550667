"""The kernels under ASan+UBSan and TSan builds of the emulator, in a subprocess that preloads the runtime.
Small on purpose: these run in the default `pytest`."""
import subprocess
import sys

import pytest

from tinysft.cuda.emulator import sanitizer_env

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

SUITES = {
    "address": "basic,misaligned_rows,neg_inf_logits,in_place,v1,z_loss,v50257,mixed_sizes,misaligned_views,nan_gradient",
    "thread": "v_not_multiple_of_block,misaligned_base_offset_3,in_place,ignored_rows,misaligned_views",
}


def run_checks(sanitize, *args, timeout=240):
    """Runs `python -m tinysft.cuda.checks --sanitize ...` with the sanitizer runtime preloaded."""
    env = sanitizer_env(sanitize)
    env["PYTHONPATH"] = str(ROOT) + ":" + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "tinysft.cuda.checks", "--sanitize", sanitize, "--quick", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.sanitizer
@pytest.mark.parametrize("sanitize", list(SUITES))
def test_kernels_run_clean_under_sanitizer(sanitize):
    result = run_checks(sanitize, "--cases", SUITES[sanitize])
    if sanitize == "thread" and "FATAL: ThreadSanitizer" in result.stderr:
        pytest.skip(f"TSan cannot start here: {result.stderr.strip().splitlines()[0]}")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("PASS") == len(SUITES[sanitize].split(","))
