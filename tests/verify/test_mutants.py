"""No check can pass vacuously: each one fails on deliberately wrong implementations."""
import pytest

from tinysft.verify import catalogue, run_check

from .mutants import KERNEL_CHECKS, MUTANTS

CASES = [pytest.param(name, what, make, id=f"{name}: {what}")
         for name, mutants in MUTANTS.items() for what, make in mutants]


def test_every_check_has_a_mutant():
    assert set(MUTANTS) == set(catalogue()), "each check in the catalogue needs at least one broken implementation"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name, what, make", CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_fails_on_broken_implementation(name, what, make, dtype):
    check = catalogue()[name]
    if name in KERNEL_CHECKS:
        real = run_check(check, dtype=dtype)
        if real.status == "skipped":
            pytest.skip(f"kernel checks cannot run here: {real.reason}")
    result = run_check(check, seed=0, dtype=dtype, impl=make())
    assert result.status == "failed", f"{name} did not catch '{what}': {result.to_dict()}"
    # caught by a measurement, not by the mutant crashing
    assert any(not part.ok for part in result.parts), result.reason
    assert not result.worst_error <= result.tolerance


@pytest.mark.parametrize("name, what, make", [c for c in CASES if c.values[0] not in KERNEL_CHECKS])
def test_mutants_fail_for_other_seeds_too(name, what, make):
    for seed in (1, 2):
        assert run_check(catalogue()[name], seed=seed, impl=make()).status == "failed", (name, what, seed)
