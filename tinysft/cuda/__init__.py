"""CUDA kernels (csrc/*.cu), their launchers, a CPU emulator to run them without a GPU,
and float64 NumPy references.

>>> import numpy as np
>>> from tinysft.cuda import softmax_cross_entropy
>>> loss, lse, dlogits = softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 2]))
>>> np.allclose(loss, np.log(3))
True
"""
from pathlib import Path


def csrc_dir() -> Path:
    """The kernel sources: `csrc/` of a repository checkout, else the installed `tinysft.csrc` package data."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if (checkout / "cross_entropy.cu").is_file():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("tinysft.csrc")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "cross_entropy.cu").is_file():
            return Path(location)
    raise FileNotFoundError("tinysft CUDA sources not found: neither a csrc/ checkout nor the tinysft.csrc package")


from tinysft.cuda.kernels import (  # noqa: E402
    clip_grad_norm,
    clip_grad_value,
    is_cupy_available,
    softmax_cross_entropy,
)

__all__ = ["csrc_dir", "softmax_cross_entropy", "clip_grad_norm", "clip_grad_value", "is_cupy_available"]
