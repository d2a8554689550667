"""CUDA kernels (csrc/*.cu), their launchers, a CPU emulator to run them without a GPU,
and float64 NumPy references: one module per kernel in `tinysft.cuda.ops`.

>>> import numpy as np
>>> from tinysft.cuda import softmax_cross_entropy
>>> loss, lse, dlogits = softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 2]))
>>> np.allclose(loss, np.log(3))
True
"""
from pathlib import Path


def _sources_in(folder: Path) -> bool:
    from tinysft.cuda.ops import OPS

    return all((folder / op.SOURCE).is_file() for op in OPS)


def csrc_dir() -> Path:
    """The kernel sources: `csrc/` of a repository checkout, else the installed `tinysft.csrc` package data."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if _sources_in(checkout):
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("tinysft.csrc")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if _sources_in(Path(location)):
            return Path(location)
    raise FileNotFoundError("tinysft CUDA sources not found: neither a csrc/ checkout nor the tinysft.csrc package")


from tinysft.cuda.ops import OPS  # noqa: E402

LAUNCHERS = {name: fn for op in OPS for name, fn in op.LAUNCHERS.items()}
globals().update(LAUNCHERS)

__all__ = ["csrc_dir", "OPS", "LAUNCHERS", *LAUNCHERS]
