"""``tinysft verify``: every fine-tuning formula checked numerically, as a report a reader can follow.

Each check states its formula, evaluates it independently in float64 NumPy,
and compares tinysft's implementation with it (and gradients with central
differences). One module per family: losses, optimizers, regularization,
dropout, clipping, stability, decoder, kernels, finetuning.

    >>> from tinysft.verify import run_checks
    >>> [r.status for r in run_checks(only=["mse"])]
    ['passed']

Tests inject a broken implementation through ``run_checks(impls={name: impl})``
to show that the check catches it.
"""
import sys
import time

from .registry import CHECKS, Check, Measure, Result, Skip, catalogue, run_check, run_checks, select

__all__ = [
    "CHECKS",
    "Check",
    "Measure",
    "Result",
    "Skip",
    "catalogue",
    "main",
    "run_check",
    "run_checks",
    "select",
]


def main(only=None, seed=0, dtype="float64", as_json=False, explain=None, list_checks=False) -> int:
    """The CLI entry point: prints the report; returns 0 if nothing failed, 1 if a check failed, 2 on bad input."""
    from . import report
    checks = catalogue()
    if list_checks:
        print(report.listing(list(checks.values())))
        return 0
    if explain is not None:
        if explain not in checks:
            print(f"tinysft verify: no check named {explain!r}; `tinysft verify --list` shows them", file=sys.stderr)
            return 2
        print(report.explanation(checks[explain]))
        return 0
    try:
        select(only)
    except LookupError as error:
        print(f"tinysft verify: {error.args[0]}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_checks(only=only, seed=seed, dtype=dtype)
    seconds = time.perf_counter() - start
    render = report.as_json if as_json else report.table
    print(render(results, seed=seed, dtype=dtype, seconds=seconds))
    return 1 if any(r.status == "failed" for r in results) else 0
