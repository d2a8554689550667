#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): GPU tests, kernels under compute-sanitizer,
# timings beside PyTorch and the copy bandwidth, MiniLM steps on cuda vs cpu; all output also in LOG.
#   bash benchmarks/gpu_check.sh LOG [--vendor DIR] [--model DIR] [--steps 1,2,3,4]
# Exit status: 0 every step passed, 1 a step failed, 2 no CUDA GPU (or bad arguments).
# PYTHON picks the interpreter (default python3: the system one on a bare GPU machine).
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
