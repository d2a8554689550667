"""How a kernel in csrc/ gets run: the source with its headers, and the two backends that compile it.

    be = get_backend("auto", array)          # CuPy arrays -> CupyBackend, NumPy arrays -> EmulatorBackend
    kernel = be.function("clip.cu", "clip_sumsq")
    kernel(grid, block, args)                # the cupy.RawKernel calling convention on both

`backend` is "auto" (by array type), "cupy", "emulator", or a backend object
(`EmulatorBackend(csrc=..., sanitize=...)`, used by the tests to run modified
kernels or sanitizer builds). The environment variables TINYSFT_CSRC and
TINYSFT_EMU_SANITIZE set those two for the default emulator backend.
"""
import os
import re
from pathlib import Path

import numpy as np

CUPY_OPTIONS = ("-std=c++17",)  # CuPy adds -ftz=true; precise expf/logf (no --use_fast_math): memory-bound anyway

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def load_source(path) -> str:
    """The text of a .cu file with its `#include "x.cuh"` headers (from the same folder) pasted in, once each.

    Both backends compile this one string, so their caches (keyed by the code) see a change in a header,
    and `#line` markers keep compiler messages pointing at the original file and line.
    """
    path = Path(path)
    seen = set()

    def expand(file: Path) -> str:
        text = file.read_text()
        out, last, line = [f'#line 1 "{file.name}"\n'], 0, 1
        for match in _INCLUDE.finditer(text):
            header = file.parent / match.group(1)
            if not header.is_file():
                raise FileNotFoundError(f"{file.name}: included header {match.group(1)!r} not found in {file.parent}")
            out.append(text[last:match.start()])
            line += text.count("\n", last, match.end()) + 1
            if header.name not in seen:
                seen.add(header.name)
                out.append(expand(header))
            out.append(f'\n#line {line} "{file.name}"\n')
            last = match.end() + 1
        out.append(text[last:])
        return "".join(out).replace("#pragma once\n", "")

    return expand(path)


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

            code = load_source(Path(self.csrc or csrc_dir()) / filename)
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


def check_float32(be, a, what):
    """`a` must be a C-contiguous, 4-byte aligned float32 array of the backend's array module."""
    if not isinstance(a, be.xp.ndarray):
        raise TypeError(f"{what} must be a {be.xp.__name__} array for the {be.name} backend, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {a.dtype}")
    if not a.flags.c_contiguous or (a.size and be.address(a) % 4):
        raise ValueError(f"{what} must be C-contiguous and 4-byte aligned")
