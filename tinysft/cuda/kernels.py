"""Launchers for the kernels in csrc/: one code path for CuPy arrays (cupy.RawModule) and
NumPy arrays (the CPU emulator, tinysft.cuda.emulator).

    loss, lse, dlogits = softmax_cross_entropy(logits, targets)     # logits (N, V) float32
    total_norm, nonfinite = clip_grad_norm(grads, max_norm=1.0)     # scales grads in place

`backend` is "auto" (by array type), "cupy", "emulator", or a backend object
(`EmulatorBackend(csrc=..., sanitize=...)`, used by the tests to run modified
kernels or sanitizer builds).
"""
import os
from pathlib import Path

import numpy as np

from tinysft.backend import cuda_available as is_cupy_available  # noqa: F401 (re-exported by tinysft.cuda)

CUPY_OPTIONS = ("-std=c++17",)  # CuPy adds -ftz=true; precise expf/logf (no --use_fast_math): memory-bound anyway
CLIP_CHUNK = 16384  # elements per block in the multi-tensor kernels (a multiple of 4)
CLIP_BLOCK = 256


class EmulatorBackend:
    """NumPy arrays, kernels run by the CPU emulator. `csrc` overrides the source directory."""

    name = "emulator"
    xp = np

    def __init__(self, csrc=None, sanitize=None):
        self.csrc, self.sanitize, self._modules = csrc, sanitize, {}

    def function(self, filename, kernel):
        if filename not in self._modules:
            from tinysft.cuda import csrc_dir
            from tinysft.cuda.emulator import EmuModule

            path = Path(self.csrc or csrc_dir()) / filename
            self._modules[filename] = EmuModule(path=path, sanitize=self.sanitize)
        return self._modules[filename].get_function(kernel)

    @staticmethod
    def address(array) -> int:
        return array.ctypes.data


class CupyBackend:
    """CuPy arrays, kernels compiled by NVRTC through cupy.RawModule."""

    name = "cupy"

    def __init__(self, csrc=None):
        import cupy

        self.xp, self.csrc, self._modules = cupy, csrc, {}

    def function(self, filename, kernel):
        if filename not in self._modules:
            from tinysft.cuda import csrc_dir

            code = (Path(self.csrc or csrc_dir()) / filename).read_text()
            self._modules[filename] = self.xp.RawModule(code=code, options=CUPY_OPTIONS)
        return self._modules[filename].get_function(kernel)

    @staticmethod
    def address(array) -> int:
        return array.data.ptr


_backends = {}


def get_backend(backend, array):
    """Resolves "auto" / "cupy" / "emulator" / a backend object for `array`."""
    if not isinstance(backend, str):
        return backend
    if backend == "auto":
        backend = "cupy" if type(array).__module__.split(".")[0] == "cupy" else "emulator"
    if backend not in ("cupy", "emulator"):
        raise ValueError(f"backend must be 'auto', 'cupy' or 'emulator', got {backend!r}")
    if backend not in _backends:
        if backend == "cupy":
            _backends[backend] = CupyBackend()
        else:
            _backends[backend] = EmulatorBackend(os.environ.get("TINYSFT_CSRC"),
                                                 os.environ.get("TINYSFT_EMU_SANITIZE") or None)
    return _backends[backend]


def _check_array(be, a, what):
    if not isinstance(a, be.xp.ndarray):
        raise TypeError(f"{what} must be a {be.xp.__name__} array for the {be.name} backend, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {a.dtype}")
    if not a.flags.c_contiguous or (a.size and be.address(a) % 4):
        raise ValueError(f"{what} must be C-contiguous and 4-byte aligned")


def ce_block_size(vocab: int) -> int:
    """Threads per row: about 16 logits per thread, a power of two in [32, 1024]."""
    return int(min(1024, max(32, 1 << max(0, (-(-vocab // 16) - 1).bit_length()))))


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, row_scale=None,
                          in_place=False, backend="auto", block_size=None):
    """Fused softmax cross-entropy forward and backward (csrc/cross_entropy.cu).

    logits (N, V) float32, targets (N,) integers. Returns float32 (loss_rows (N,), lse (N,), dlogits (N, V)):
    loss_i = (1 - eps)(lse_i - x_it) + eps (lse_i - mean_j x_ij) + z lse_i^2, and
    dlogits_ij = row_scale (softmax_ij (1 + 2 z lse_i) - (1 - eps)[j == t_i] - eps / V), zero on ignored rows.
    row_scale defaults to 1 / number of non-ignored rows (mean reduction). in_place writes dlogits over logits.
    """
    be = get_backend(backend, logits)
    xp = be.xp
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must have shape (N, V), got shape {getattr(logits, 'shape', None)}")
    _check_array(be, logits, "logits")
    n, v = logits.shape
    if not isinstance(targets, xp.ndarray) or targets.shape != (n,):
        raise ValueError(f"targets must be a {xp.__name__} array of shape ({n},) for logits {logits.shape}, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if v == 0:
        raise ValueError("logits must have V >= 1 columns")
    targets = xp.ascontiguousarray(targets, dtype=np.int64)
    if row_scale is None:
        row_scale = 1.0 / max(int((targets != ignore_index).sum()), 1)
    loss = xp.empty(n, dtype=np.float32)
    lse = xp.empty(n, dtype=np.float32)
    dlogits = logits if in_place else xp.empty_like(logits)
    if n == 0:
        return loss, lse, dlogits
    error = xp.zeros(1, dtype=np.int32)
    kernel = be.function("cross_entropy.cu", "cross_entropy_fwd_bwd")
    kernel((n,), (block_size or ce_block_size(v),),
           (logits, dlogits, targets, loss, lse, error, np.int64(v), np.int64(ignore_index),
            np.float32(label_smoothing), np.float32(z_loss), np.float32(row_scale)))
    if int(error[0]):
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= v))]
        raise IndexError(f"target {int(bad[0])} is out of range for {v} classes "
                         f"(ignore_index={ignore_index}); {int(bad.size)} bad targets")
    return loss, lse, dlogits


def _chunk_table(be, grads, what):
    """Device tables for the multi-tensor kernels: (ptrs, sizes, chunk_tensor, chunk_start), #chunks."""
    for i, g in enumerate(grads):
        _check_array(be, g, f"{what}[{i}]")
    sizes = np.array([g.size for g in grads], dtype=np.int64)
    counts = -(-sizes // CLIP_CHUNK)
    chunk_tensor = np.repeat(np.arange(len(grads), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    chunk_start = (np.arange(chunk_tensor.size, dtype=np.int64) - first) * CLIP_CHUNK
    ptrs = np.array([be.address(g) for g in grads], dtype=np.uint64)
    xp = be.xp
    return (xp.asarray(ptrs), xp.asarray(sizes), xp.asarray(chunk_tensor), xp.asarray(chunk_start)), chunk_tensor.size


def clip_grad_norm(grads, max_norm, *, backend="auto"):
    """Global L2-norm clipping in place (csrc/clip.cu), like torch.nn.utils.clip_grad_norm_.

    norm = sqrt(sum over all tensors of x^2), accumulated in float64, deterministic;
    every x *= min(1, max_norm / (norm + 1e-6)). Returns (norm as a Python float, nonfinite).
    When the norm is inf or NaN the gradients are left untouched and nonfinite is True.
    """
    grads = list(grads)
    if not grads:
        return 0.0, False
    be = get_backend(backend, grads[0])
    xp = be.xp
    tables, num_chunks = _chunk_table(be, grads, "grads")
    if num_chunks == 0:
        return 0.0, False
    partial = xp.empty(num_chunks, dtype=np.float64)
    norm = xp.empty(1, dtype=np.float64)
    scale = xp.empty(1, dtype=np.float32)
    nonfinite = xp.zeros(1, dtype=np.int32)
    chunk = np.int64(CLIP_CHUNK)
    be.function("clip.cu", "clip_sumsq")((num_chunks,), (CLIP_BLOCK,), (*tables, chunk, partial))
    be.function("clip.cu", "clip_finalize")((1,), (CLIP_BLOCK,), (partial, np.int64(num_chunks), float(max_norm),
                                                            norm, scale, nonfinite))
    be.function("clip.cu", "clip_scale")((num_chunks,), (CLIP_BLOCK,), (*tables, chunk, scale))
    return float(norm[0]), bool(int(nonfinite[0]))


def clip_grad_value(grads, clip_value, *, backend="auto"):
    """Clamps every gradient to [-clip_value, clip_value] in place (NaN stays NaN), like clip_grad_value_."""
    grads = list(grads)
    if not grads:
        return
    be = get_backend(backend, grads[0])
    tables, num_chunks = _chunk_table(be, grads, "grads")
    if num_chunks:
        be.function("clip.cu", "clip_value")((num_chunks,), (CLIP_BLOCK,),
                                             (*tables, np.int64(CLIP_CHUNK), np.float32(abs(clip_value))))
