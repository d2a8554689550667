"""Planted bugs: each mutation of a kernel must be caught by the checks (tinysft/cuda/checks.py) on the
emulator (wrong values, NaN, a schedule-dependent result, an emulator error, a crash) or, failing
that, by the ASan+UBSan build. Each mutant runs in a subprocess, so a crash is a finding, not a failure."""
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tinysft.cuda import csrc_dir
from tinysft.cuda.emulator import sanitizer_env

ROOT = Path(__file__).resolve().parents[2]

# (id, file, original text, mutated text, op whose checks run: None = every op)
MUTATIONS = [
    ("common: __syncthreads dropped in block_reduce", "common.cuh",
     "    __syncthreads();\n    v = lane < nwarps", "    v = lane < nwarps", None),
    ("common: for_each tail loop j <= n", "common.cuh",
     "for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) f(j, x[j]);",
     "for (long long j = head + 4 * n4 + threadIdx.x; j <= n; j += blockDim.x) f(j, x[j]);", None),
    ("common: transform tail loop j <= n", "common.cuh",
     "for (long long j = head + 4 * n4 + threadIdx.x; j < n; j += blockDim.x) y[j] = f(j, x[j]);",
     "for (long long j = head + 4 * n4 + threadIdx.x; j <= n; j += blockDim.x) y[j] = f(j, x[j]);", None),
    ("common: float4 loads without the alignment head", "common.cuh",
     "    long long head = (long long)((16 - ((unsigned long long)x & 15)) & 15) / 4;\n    return head < n ? head : n;",
     "    return 0;", None),
    ("common: reads never-written shared memory", "common.cuh",
     "v = lane < nwarps ? part[lane] : empty;", "v = part[lane];", None),
    ("ce: (-inf, -inf) merge guard removed", "cross_entropy.cu",
     "    if (mm == NEG_INF) return r;  // both empty: exp(-inf - -inf) would be NaN\n", "", "ce"),
    ("ce: idle threads return before the reduction", "cross_entropy.cu",
     "    long long row = blockIdx.x;\n", "    long long row = blockIdx.x;\n    if (threadIdx.x >= V) return;\n", "ce"),
    ("ce: shared array too small", "cross_entropy.cu",
     "__shared__ RowStats warp_part[32];", "__shared__ RowStats warp_part[16];", "ce"),
    ("ce: target logit read after the barrier (in place)", "cross_entropy.cu",
     "    if (threadIdx.x == 0 && valid) x_t = x[t];  // read before the barrier: dx may alias x\n"
     "    r = block_reduce(r, warp_part, RowStats{NEG_INF, 0.0f, 0.0}, ce_merge);\n",
     "    r = block_reduce(r, warp_part, RowStats{NEG_INF, 0.0f, 0.0}, ce_merge);\n"
     "    if (threadIdx.x == 0 && valid) x_t = x[t];\n", "ce"),
    ("ce: z-loss gradient factor 2 dropped", "cross_entropy.cu",
     "1.0f + 2.0f * z_loss * lse", "1.0f + z_loss * lse", "ce"),
    ("clip: finalize reads one partial past the end", "clip.cu",
     "i < num_partial; i += blockDim.x", "i <= num_partial; i += blockDim.x", "clip"),
    ("clip: scale not capped at 1", "clip.cu",
     "*scale = finite && coef < 1.0 ? (float)coef : 1.0f;", "*scale = finite ? (float)coef : 1.0f;", "clip"),
    ("clip: clip-by-value turns NaN into -c", "clip.cu",
     "return v < -clip ? -clip : (v > clip ? clip : v);", "return fminf(fmaxf(v, -clip), clip);", "clip"),
]


def _classify(result, sanitize):
    """How a failing checks run caught the bug, or None if every check passed."""
    out = result.stdout + result.stderr
    if result.returncode == 0:
        return None
    if sanitize:
        found = re.search(r"(AddressSanitizer: [\w-]+|runtime error: [^\n]{0,60})", out)
        return f"ASan/UBSan: {found.group(1) if found else 'exit ' + str(result.returncode)}"
    if result.returncode < 0:
        return f"crash (signal {-result.returncode})"
    line = next((l for l in result.stdout.splitlines() if l.startswith("FAIL")), "")
    if "EmulatorError" in line:
        return "emulator error: " + line.split("EmulatorError: ")[1].split(": ", 1)[-1][:90]
    if "not bit-identical" in line:
        return "schedule mismatch: " + line[5:90]
    if "nan" in line.lower():
        return "NaN: " + line[5:90]
    return "wrong values: " + line[5:90]


def _run(mutation, tmp: Path):
    ident, filename, old, new, only = mutation
    source = (csrc_dir() / filename).read_text()
    assert source.count(old) == 1, f"{ident}: mutation anchor not found exactly once in {filename}"
    shutil.copytree(csrc_dir(), tmp, ignore=shutil.ignore_patterns("emu"))
    (tmp / filename).write_text(source.replace(old, new))
    for sanitize in (None, "address"):
        env = sanitizer_env(sanitize) if sanitize else dict(__import__("os").environ)
        env["PYTHONPATH"] = str(ROOT) + ":" + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "tinysft.cuda.checks", "--csrc", str(tmp), "--quick", "--fail-fast"]
        cmd += (["--only", only] if only else []) + (["--sanitize", sanitize] if sanitize else [])
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        caught = _classify(result, sanitize)
        if caught:
            return caught
    return None


def test_every_planted_bug_is_caught(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda im: _run(im[1], tmp_path / f"m{im[0]}"), enumerate(MUTATIONS)))
    report = "\n".join(f"{m[0]:52s} -> {r or 'NOT CAUGHT'}" for m, r in zip(MUTATIONS, results))
    print("\n" + report)
    assert all(results), "planted bugs not caught:\n" + report


def test_unmutated_kernels_pass_the_same_run(tmp_path):
    """The control: with no mutation the subprocess run passes, so a failure above is the bug's doing."""
    shutil.copytree(csrc_dir(), tmp_path / "csrc", ignore=shutil.ignore_patterns("emu"))
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tinysft.cuda.checks", "--csrc", str(tmp_path / "csrc"),
                             "--quick"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
