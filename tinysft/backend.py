"""Array backends: NumPy on the CPU (always there), CuPy on CUDA (optional).

Every op in tinysft is written once against an array module ``xp``; this module
maps a device name to that module and moves arrays between devices.

>>> import numpy as np
>>> xp_for("cpu") is np, device_of(np.zeros(2)), to_device(np.ones(2), "cpu")
(True, 'cpu', array([1., 1.]))
>>> target = np.zeros(3)
>>> scatter_add(target, np.array([0, 2, 0]), np.array([1.0, 2.0, 3.0]))  # repeats add up
>>> target
array([4., 0., 2.])
"""
import numpy as np

DEVICES = ("cpu", "cuda")


class DeviceError(RuntimeError):
    """A device was asked for that is not there, or tensors on two devices were mixed."""


def _import_cupy():
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.is_available() else None
    except Exception:  # a CuPy without a driver can raise from is_available
        return None


_cupy = _import_cupy()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 1 GiB for reuse instead of handing them
    back to the kernel; True if it took effect (glibc only; elsewhere nothing changes).

    By default glibc gives every block over 128 KiB its own ``mmap`` and unmaps it on free, so
    each fresh activation or gradient of a training step starts as untouched pages that fault
    in on first write: a MiniLM step at 16×64 took ~18,600 minor page faults and ~157 ms of
    kernel time, against 6 faults and ~1 ms with freed blocks kept (PyTorch's CPU allocator
    caches for the same reason). The setting is process-wide and keeps the peak heap mapped,
    so the application chooses it — the ``tinysft`` command does at start — not the library.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 1 << 30
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA GPU."""
    return _cupy is not None


def xp_for(device: str):
    """The array module that holds arrays for ``device`` ('cpu' -> numpy, 'cuda' -> cupy)."""
    if device == "cpu":
        return np
    if device == "cuda":
        if _cupy is None:
            raise DeviceError(
                "device 'cuda' requested, but no CUDA GPU is usable: install tinysft[cuda] "
                "(CuPy) on a machine with an NVIDIA driver, or use device='cpu'")
        return _cupy
    raise DeviceError(f"unknown device {device!r}; expected one of {DEVICES}")


def device_of(array) -> str:
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return "cuda"
    return "cpu"


def to_device(array, device: str):
    """Copy ``array`` to ``device`` (no copy when it is already there)."""
    if device_of(array) == device:
        return array
    if device == "cpu":
        return _cupy.asnumpy(array)
    return xp_for(device).asarray(array)


def scatter_add(target, index, values):
    """``target[index] += values`` with repeated indices summed (in place)."""
    if device_of(target) == "cuda":
        import cupyx
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)
