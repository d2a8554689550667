"""The same cases through cupy.RawModule on a GPU, against the float64 reference and the emulator."""
import numpy as np
import pytest

from tinysft.backend import cuda_available
from tinysft.cuda import checks, softmax_cross_entropy
from tinysft.cuda.compare import to_backend
from tinysft.cuda.ops import cross_entropy

pytestmark = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU (cupy missing or no device)")


@pytest.mark.parametrize("case_id", list(checks.CASES))
def test_registered_case_on_gpu(case_id):
    errors = checks.run_case(case_id, backend="cupy")
    assert all(e <= 1e-6 for what, e in errors.items() if what in ("loss", "lse", "norm")), errors


@pytest.mark.parametrize("name", ["basic", "misaligned_rows", "label_smoothing", "z_loss", "v50257"])
def test_gpu_agrees_with_emulator(name):
    """Both run the same source: results agree to a few ulp (nvcc may contract a*b-c into an FMA, g++ does not)."""
    import cupy

    input_kw, kw, block = cross_entropy.CASES[name]
    x, t = cross_entropy.make_input(**input_kw)
    cpu = softmax_cross_entropy(x, t, block_size=block, **kw)
    gpu = softmax_cross_entropy(to_backend("cupy", x), cupy.asarray(t), block_size=block, **kw)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b.get(), a, rtol=4e-7, atol=2.0**-24 * np.abs(a).max())


def test_cupy_flushes_subnormals_like_the_emulator():
    """The emulator runs with flush-to-zero because CuPy compiles with -ftz=true; this checks that premise."""
    import cupy

    from tinysft.cuda.runtime import CUPY_OPTIONS

    code = 'extern "C" __global__ void ftz(const float* in, float* out) { out[0] = in[0] * 0.5f; out[1] = in[1] * 1e30f; }'
    kern = cupy.RawModule(code=code, options=CUPY_OPTIONS).get_function("ftz")
    x = cupy.asarray(np.array([np.finfo(np.float32).tiny, 1e-40], np.float32))
    out = cupy.ones(2, dtype=cupy.float32)
    kern((1,), (1,), (x, out))
    np.testing.assert_array_equal(out.get(), [0.0, 0.0])
