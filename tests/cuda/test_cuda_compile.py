"""Every kernel compiles with nvcc for sm_80 and sm_90 with no register spills and no stack frame.
Needs nvcc on PATH, not a GPU."""
import re
import shutil
import subprocess

import pytest

from tinysft.cuda import csrc_dir

SOURCES = sorted(p.name for p in csrc_dir().glob("*.cu"))


def ptxas_report(source, arch, out_dir):
    """`ptxas -v` lines for one .cu file: {kernel: (registers, stack bytes, spill store bytes, spill load bytes)}."""
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-ftz=true", "-Xptxas", "-v",
           "-o", str(out_dir / f"{source}.{arch}.cubin"), str(csrc_dir() / source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = {}
    for block in re.split(r"ptxas info\s*: Compiling entry function ", result.stderr)[1:]:
        name = re.match(r"'(\w+)'", block).group(1)
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
        registers = int(re.search(r"Used (\d+) registers", block).group(1))
        report[name] = (registers, stack, stores, loads)
    return report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES)
def test_no_spills_and_no_stack(source, arch, tmp_path):
    report = ptxas_report(source, arch, tmp_path)
    kernels = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', (csrc_dir() / source).read_text())
    assert sorted(report) == sorted(kernels)
    for name, (registers, stack, stores, loads) in report.items():
        print(f"{arch} {name}: {registers} registers, {stack} bytes stack, {stores}/{loads} spill bytes")
        assert (stack, stores, loads) == (0, 0, 0), f"{name} on {arch}: stack {stack}, spills {stores}/{loads}"
