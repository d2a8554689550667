"""Runs the correctness cases of every kernel in tinysft.cuda.ops.OPS, one line each.

Each case runs through its launcher on a backend and is compared with the op's float64 reference (the
tolerances are stated in each op module). On the emulator every case also runs under several thread
schedules, which must give bit-identical outputs. Used by the tests, the planted-bug runs and
benchmarks/gpu_kernels.py.

    python -m tinysft.cuda.checks [--csrc DIR] [--sanitize address|thread] [--only OP] [--cases a,b]
                                  [--quick] [--fail-fast]
"""
import argparse
import sys

from tinysft.cuda.compare import ALL_SCHEDULES, QUICK_SCHEDULES
from tinysft.cuda.ops import BY_NAME, OPS
from tinysft.cuda.runtime import EmulatorBackend

# "op/case" -> (op module, case name), in registry order
CASES = {f"{op.NAME}/{case}": (op, case) for op in OPS for case in op.CASES}


def select(only=None, cases=None):
    """Case ids of op `only` (all ops when None), narrowed to `cases` (ids "op/case" or bare case names)."""
    chosen = [cid for cid, (op, _) in CASES.items() if only in (None, op.NAME)]
    if cases:
        unknown = [c for c in cases if c not in CASES and not any(cid.endswith("/" + c) for cid in CASES)]
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(unknown)}; the cases are: {', '.join(CASES)}")
        chosen = [cid for cid in chosen if cid in cases or CASES[cid][1] in cases]
    return chosen


def run_case(case_id, backend="emulator", schedules=ALL_SCHEDULES):
    """Runs one case ("op/case"); returns its dict of max relative errors, raises CheckFailure."""
    op, case = CASES[case_id]
    return op.check(case, backend, schedules)


def run_all(backend="emulator", *, only=None, cases=None, quick=False, fail_fast=False, out=sys.stdout):
    """Runs every case (or those selected); prints one line each; returns the number of failures."""
    schedules = QUICK_SCHEDULES if quick else ALL_SCHEDULES
    failures = 0
    for case_id in select(only, cases):
        try:
            errors = run_case(case_id, backend, schedules)
            print(f"PASS {case_id} " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()), file=out, flush=True)
        except Exception as e:  # report every kind of failure: wrong values, emulator errors, argument errors
            failures += 1
            print(f"FAIL {case_id}: {type(e).__name__}: {e}", file=out, flush=True)
            if fail_fast:
                break
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csrc", help="kernel source directory (default: the package's)")
    p.add_argument("--sanitize", choices=["address", "thread"])
    p.add_argument("--only", choices=list(BY_NAME))
    p.add_argument("--cases", help="comma-separated case names (op/case or case)")
    p.add_argument("--quick", action="store_true", help="fewer schedules")
    p.add_argument("--fail-fast", action="store_true")
    args = p.parse_args(argv)
    backend = EmulatorBackend(args.csrc, args.sanitize)
    cases = args.cases.split(",") if args.cases else None
    return 1 if run_all(backend, only=args.only, cases=cases, quick=args.quick, fail_fast=args.fail_fast) else 0


if __name__ == "__main__":
    sys.exit(main())
