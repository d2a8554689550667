"""tinysft: a from-scratch autograd engine for supervised fine-tuning.

The root package is the engine: ``tensor`` (Tensor, autograd, the primitives and
the op-definition API), ``functional`` (the fused composites), ``special``,
``backend``, ``rng`` and ``gradcheck``. The libraries built on it are the
subpackages ``nn``, ``optim``, ``models``, ``finetune``, ``data``, ``io``,
``cuda`` and ``verify``; the ``tinysft`` command is ``tinysft.app``.
"""
import os

# Read by OpenBLAS when NumPy loads it, hence first: an idle OpenBLAS worker then sleeps at once
# (2⁴ cycles) instead of spinning for 2²⁸ cycles (~0.1 s) after every BLAS call, a core that the
# blocks of ``tinysft.threads`` after each GEMM need (a MiniLM forward at 32×64 on 2 cores: 870 →
# 700 ms). A value already set is kept; a NumPy imported before tinysft keeps OpenBLAS's default.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import functional
from .backend import DeviceError, cuda_available
from .gradcheck import GradcheckError, gradcheck
from .rng import get_rng_state, manual_seed, set_rng_state
from .tensor import ShapeError, Tensor, is_grad_enabled, no_grad, ones, randn, tensor, zeros

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "zeros", "ones", "randn", "no_grad", "is_grad_enabled", "gradcheck",
           "GradcheckError", "ShapeError", "DeviceError", "cuda_available", "manual_seed",
           "get_rng_state", "set_rng_state", "functional"]
