"""The same cases through cupy.RawModule on a GPU, against the float64 reference and the emulator."""
import numpy as np
import pytest

from tinysft.cuda import checks, is_cupy_available, softmax_cross_entropy

pytestmark = pytest.mark.skipif(not is_cupy_available(), reason="no CUDA GPU (cupy missing or no device)")


@pytest.mark.parametrize("name", list(checks.CE_CASES))
def test_cross_entropy_on_gpu(name):
    errors = checks.check_ce(name, backend="cupy")
    assert errors["loss"] <= 1e-6


@pytest.mark.parametrize("name", list(checks.CLIP_CASES))
def test_clip_on_gpu(name):
    checks.check_clip(name, backend="cupy")


@pytest.mark.parametrize("name", ["basic", "misaligned_rows", "label_smoothing", "v50257"])
def test_gpu_agrees_with_emulator(name):
    """Both run the same source: results agree to a few ulp (nvcc may contract a*b-c into an FMA, g++ does not)."""
    import cupy

    input_kw, kw, block = checks.CE_CASES[name]
    x, t = checks.ce_input(**input_kw)
    cpu = softmax_cross_entropy(x, t, block_size=block, **kw)
    gpu = softmax_cross_entropy(checks.to_backend("cupy", x), cupy.asarray(t), block_size=block, **kw)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b.get(), a, rtol=4e-7, atol=2.0**-24 * np.abs(a).max())
