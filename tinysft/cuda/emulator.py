"""Runs the unchanged CUDA C kernels on the CPU, with an interface shaped like CuPy's.

`EmuModule(path)` writes a stub that #includes `csrc/emu/cuda_emu.h` and the `.cu`
file (its own headers pasted in by `tinysft.cuda.runtime.load_source`), compiles it with `g++ -std=c++20 -O2 -fno-weak` into a shared library cached
by content hash (under `$TINYSFT_CACHE` or `~/.cache/tinysft/emu`), and
`get_function(name)` returns a kernel called like `cupy.RawKernel`:

    kern(grid, block, args, shared_mem=0)

Pointer parameters take NumPy arrays of the exact element type (non-const ones
must be writeable); scalars follow CuPy's conversion rules (Python int -> int64,
Python float -> float64), so a `float` parameter needs `np.float32(x)`: passing a
Python float is an error here because CuPy would silently pass a double.

Each CUDA thread is a fiber; `schedule(...)` picks the order in which fibers run
between barriers. Errors in the kernel's use of barriers or warp operations raise
`EmulatorError`. `sanitize="address"` (ASan + UBSan) or `"thread"` (TSan) builds
need the sanitizer runtime preloaded: see `sanitizer_env`.
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SCHEDULES = ("forward", "reverse", "greedy", "greedy_reverse", "random")
SANITIZERS = {
    None: ["-O2"],
    "address": ["-O0", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
_RUNTIME = {"address": ("libasan.so", "__asan_init"), "thread": ("libtsan.so", "__tsan_init")}
_BASE_FLAGS = ["-std=c++20", "-fno-weak", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]

_SCALARS = {  # code -> (numpy type, ctypes type, Python type CuPy maps to it)
    "f32": (np.float32, ctypes.c_float, None),
    "f64": (np.float64, ctypes.c_double, float),
    "i32": (np.int32, ctypes.c_int32, None),
    "u32": (np.uint32, ctypes.c_uint32, None),
    "i64": (np.int64, ctypes.c_int64, int),
    "u64": (np.uint64, ctypes.c_uint64, None),
}
_DTYPES = {code: np_type for code, (np_type, _, _) in _SCALARS.items()}  # pointer element types

_schedule = ("forward", 0)
_libraries = {}


class EmulatorError(RuntimeError):
    """A kernel misused barriers or warp operations, or the emulator could not build it."""


@contextlib.contextmanager
def schedule(name: str, seed: int = 0):
    """Run launches inside the block under schedule `name` (see SCHEDULES); `seed` drives "random"."""
    global _schedule
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    previous, _schedule = _schedule, (name, seed)
    try:
        yield
    finally:
        _schedule = previous


def cache_dir() -> Path:
    return Path(os.environ.get("TINYSFT_CACHE") or Path.home() / ".cache" / "tinysft") / "emu"


def emu_include_dir() -> Path:
    from tinysft.cuda import csrc_dir

    return csrc_dir() / "emu"


def sanitizer_env(sanitize: str) -> dict:
    """Environment for a subprocess that loads a sanitizer build into an uninstrumented Python."""
    lib, _ = _RUNTIME[sanitize]
    runtime = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True, check=True)
    env = dict(os.environ, LD_PRELOAD=runtime.stdout.strip())
    if sanitize == "address":
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=99"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=99"
    else:
        env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=99:report_signal_unsafe=0"
    return env


@functools.cache
def _compiler_version() -> str:
    return subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout


def build(code: str, *, sanitize=None, name: str = "kernel.cu", extra_flags=()) -> Path:
    """Compiles `code` (CUDA C) with the emulator header; returns the cached shared library.

    extra_flags go to g++, e.g. ("-DEMU_USE_UCONTEXT",) for the portable context switch.
    """
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {list(SANITIZERS)}, got {sanitize!r}")
    kernels = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', code)
    if not kernels:
        raise EmulatorError(f"{name}: no extern \"C\" __global__ kernels found")
    include = emu_include_dir()
    flags = _BASE_FLAGS + SANITIZERS[sanitize] + list(extra_flags)
    stub = '#include "cuda_emu.h"\n#include "kernel.cu"\nEMU_KERNEL_TABLE({})\n'.format(
        ", ".join(f"EMU_KERNEL({k})" for k in kernels))
    key = hashlib.sha256("\0".join(
        [code, stub, (include / "cuda_emu.h").read_text(), " ".join(flags), _compiler_version()]).encode())
    out_dir = cache_dir() / key.hexdigest()[:24]
    lib = out_dir / "kernels.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel.cu").write_text(code)
    (out_dir / "stub.cpp").write_text(stub)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = ["g++", *flags, f"-I{include}", "-I", str(out_dir), str(out_dir / "stub.cpp"), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise EmulatorError(f"compiling {name} for the emulator failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, lib)
    return lib


def _load(lib: Path, sanitize):
    if lib in _libraries:
        return _libraries[lib]
    if sanitize is not None and not hasattr(ctypes.CDLL(None), _RUNTIME[sanitize][1]):
        raise EmulatorError(f"the {sanitize} sanitizer build needs its runtime preloaded; run Python with "
                            f"tinysft.cuda.emulator.sanitizer_env({sanitize!r}) (LD_PRELOAD={_RUNTIME[sanitize][0]})")
    dll = ctypes.CDLL(str(lib))
    dll.emu_kernel_name.restype = ctypes.c_char_p
    dll.emu_kernel_signature.restype = ctypes.c_char_p
    dll.emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_longlong),
                               ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_ulonglong,
                               ctypes.c_char_p, ctypes.c_int]
    _libraries[lib] = dll
    return dll


class EmuModule:
    """Counterpart of `cupy.RawModule(code=...)` / `RawModule(path=...)`."""

    def __init__(self, code: str = None, *, path=None, sanitize=None, extra_flags=()):
        if (code is None) == (path is None):
            raise ValueError("give exactly one of code and path")
        self.name = Path(path).name if path is not None else "<code>"
        if path is not None:
            from tinysft.cuda.runtime import load_source

            code = load_source(path)  # with its csrc/*.cuh headers pasted in
        self.sanitize = sanitize
        self._dll = _load(build(code, sanitize=sanitize, name=self.name, extra_flags=extra_flags), sanitize)
        self._kernels = {}
        for k in range(self._dll.emu_num_kernels()):
            kname = self._dll.emu_kernel_name(k).decode()
            self._kernels[kname] = (k, self._dll.emu_kernel_signature(k).decode().split(","))

    def get_function(self, name: str) -> "EmuKernel":
        if name not in self._kernels:
            raise KeyError(f"{self.name} has no kernel {name!r} (has {sorted(self._kernels)})")
        index, signature = self._kernels[name]
        return EmuKernel(self._dll, index, name, signature)


def _dims(value, what):
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class EmuKernel:
    """Counterpart of `cupy.RawKernel`: `kern(grid, block, args, shared_mem=0)`."""

    def __init__(self, dll, index, name, signature):
        self._dll, self._index, self.name, self.signature = dll, index, name, signature

    def _convert(self, i, code, arg):
        where = f"{self.name}: argument {i} ({code})"
        if code.startswith("p"):
            dtype = _DTYPES[code[1:4]]
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{where} expects a NumPy {np.dtype(dtype)} array, got {type(arg).__name__}")
            if arg.dtype != dtype:
                raise TypeError(f"{where} expects dtype {np.dtype(dtype)}, got {arg.dtype}")
            if not code.endswith("c") and not arg.flags.writeable:
                raise TypeError(f"{where} is written by the kernel but the array is read-only")
            return ctypes.c_void_p(arg.ctypes.data)
        np_type, c_type, py_type = _SCALARS[code]
        ok = type(arg) is np_type or (py_type is not None and type(arg) is py_type)
        if not ok:
            hint = f" (CuPy passes a Python {type(arg).__name__} as a different type)" if isinstance(
                arg, (int, float)) else ""
            raise TypeError(f"{where} expects {np_type.__name__}, got {type(arg).__name__}{hint}")
        if py_type is int and not np.iinfo(np_type).min <= int(arg) <= np.iinfo(np_type).max:
            raise OverflowError(f"{where}: {arg} does not fit")
        return c_type(arg)

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"{self.name}: block {block} has more than 1024 threads")
        if shared_mem:
            raise ValueError(f"{self.name}: the emulator does not support dynamic shared memory")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        values = [self._convert(i, code, a) for i, (code, a) in enumerate(zip(self.signature, args))]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        name, seed = _schedule
        err = ctypes.create_string_buffer(2048)
        rc = self._dll.emu_launch(self._index, (ctypes.c_longlong * 3)(*grid), (ctypes.c_longlong * 3)(*block),
                                  pointers, SCHEDULES.index(name), seed, err, len(err))
        if rc != 0:
            raise EmulatorError(f"{self.name} (grid {grid}, block {block}, schedule {name}): {err.value.decode()}")
