"""The examples in the engine's module docstrings run, and print what they show.

Every engine module (the root package: tensor, functional, special, backend, rng,
gradcheck) must carry at least one example; so must the two library modules
listed after them, whose examples document a rule stated once.
"""
import doctest
import importlib

import pytest

import tinysft

ENGINE = ["tinysft.tensor", "tinysft.functional", "tinysft.special", "tinysft.backend", "tinysft.rng",
          "tinysft.gradcheck"]
ALSO = ["tinysft.optim.groups", "tinysft.app.config"]


@pytest.mark.parametrize("name", ENGINE + ALSO)
def test_docstring_examples_run(name):
    state = tinysft.get_rng_state()  # an example may seed the generators; the tests after it must not notice
    try:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE,
                                 report=False)
    finally:
        tinysft.set_rng_state(state)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
