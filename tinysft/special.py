"""Special functions NumPy lacks: erf, the normal CDF/PDF, and GELU with its derivative.

erf, by dtype:
- float64 (and anything but float32): Cephes' rational approximations (S. Moshier,
  public domain, the ones SciPy's ``ndtr`` compiles), about 1e-16 absolute:
    |x| ≤ 1:  erf(x) = x · T(x²) / U(x²)
    |x| > 1:  erf(x) = sign(x)·(1 − e^(−x²) · P(|x|) / Q(|x|))   (|x| clipped to 8, erfc(8) < 1e-29)
- float32: Eigen's float32 rational erf (the one PyTorch's CPU kernels vectorise),
  erf(x) ≈ x·P(x²)/Q(x²) on x clipped to [−4, 4], max abs error 4.5e-7 — a few
  float32 ulps, at a third of the array passes.
On the CPU the work runs over 64K-element chunks so every temporary stays in cache.

>>> import numpy as np
>>> erf(np.array([0.5])).round(8), normal_cdf(np.array([0.0, 1.96])).round(6)
(array([0.52049988]), array([0.5     , 0.975002]))
>>> value, saved = gelu(np.array([1.0]))  # GELU(1) = Φ(1)
>>> value.round(8), gelu_backward(np.array([1.0]), np.array([1.0]), saved).round(8)  # Φ(1) + φ(1)
(array([0.84134475]), array([1.08331547]))
"""
import math

_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
      7.00332514112805075473e3, 5.55923013010394962768e4)
_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
      2.26290000613890934246e4, 4.92673942608635921086e4)
_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
      4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
      9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
      9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
      1.65666309194161350182e3, 5.57535340817727675546e2)
_EIGEN_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_EIGEN_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CHUNK = 1 << 16


def _module_of(x):
    from .backend import device_of, xp_for
    return xp_for(device_of(x))


def _polyval(coefficients, x, out=None):
    """Horner's rule, highest power first, into ``out`` (a new array when None; ``x`` is not changed)."""
    result = x * coefficients[0] if out is None else _module_of(x).multiply(x, coefficients[0], out=out)
    result += coefficients[1]
    for c in coefficients[2:]:
        result *= x
        result += c
    return result


def _chunked(kernel, *arrays, outputs: int = 1, work: int = 0):
    """Runs the elementwise ``kernel(xp, *inputs, *outs, *work_arrays)``, which writes its ``outputs``
    arrays in place and may use ``work`` scratch arrays, over 64K-element chunks on the CPU (one
    call on a GPU), so every array it touches stays in cache. Each block of chunks has its own
    scratch, made once: a fresh temporary per chunk and pass would cost an allocation, and page
    faults where malloc hands the memory back. The blocks are shared out over the cores
    (``threads.split_rows``): these are single-threaded ufunc passes, about 30 per element for the
    exact GELU. Each element's value depends on that element alone, so the result is the same for
    any thread count. Outputs have the first input's dtype."""
    from .threads import split_rows
    xp = _module_of(arrays[0])
    shape, dtype = arrays[0].shape, arrays[0].dtype
    # 1-D even for 0-d inputs: ufuncs give scalars for 0-d arrays, which in-place steps cannot write into
    flats = [xp.ascontiguousarray(a).reshape(-1) for a in arrays]
    size = flats[0].size
    outs = [xp.empty(size, dtype) for _ in range(outputs)]
    chunk = max(1, size if xp.__name__ != "numpy" else min(size, _CHUNK))

    def block(first, last):  # chunks [first, last)
        scratch = [xp.empty(chunk, dtype) for _ in range(work)]
        for start in range(first * chunk, min(last * chunk, size), chunk):
            stop = min(start + chunk, size)
            kernel(xp, *(a[start:stop] for a in flats + outs), *(w[:stop - start] for w in scratch))

    split_rows(xp, block, -(-size // chunk), chunk)
    return tuple(out.reshape(shape) for out in outs)


def _erf_cephes(x):
    """erf for float64 (and other non-float32 dtypes): Cephes, a new array."""
    xp = _module_of(x)
    ax = xp.abs(x)
    small = xp.minimum(ax, 1.0)
    z = small * small
    inner = _polyval(_T, z)
    inner *= small
    inner /= _polyval(_U, z)
    large = xp.clip(ax, 1.0, 8.0)
    outer = _polyval(_P, large)
    outer /= _polyval(_Q, large)
    large *= large
    outer *= xp.exp(-large, out=large)
    xp.subtract(1.0, outer, out=outer)
    result = xp.where(ax <= 1.0, inner, outer)
    result *= xp.sign(x)
    return result


def _erf_kernel(xp, x, out, z, z2, q):
    """out = erf(x); float32: Eigen's x·P(x²)/Q(x²) on x clipped to [−4, 4], in the scratch z, z2, q."""
    if x.dtype != xp.float32:
        out[...] = _erf_cephes(x)
        return
    xp.clip(x, -4.0, 4.0, out=z)
    xp.multiply(z, z, out=z2)
    _polyval(_EIGEN_P, z2, out)
    out *= z
    out /= _polyval(_EIGEN_Q, z2, q)


def erf(x):
    """The error function erf(x) = 2/√π ∫₀ˣ e^(−t²) dt, elementwise on any ``xp`` array."""
    x = _module_of(x).asarray(x)
    return _chunked(_erf_kernel, x if x.dtype.kind == "f" else x.astype(float), work=3)[0]


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2))."""
    return 0.5 * (1.0 + erf(x * _SQRT1_2))


def normal_pdf(x):
    """φ(x) = e^(−x²/2) / √(2π)."""
    return _module_of(x).exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_exact_kernel(xp, x, value, cdf, t, z, z2, q):
    """value = x·Φ(x) and cdf = Φ(x) = ½(1 + erf(x/√2)), the steps (and bits) of ``x * normal_cdf(x)``."""
    xp.multiply(x, _SQRT1_2, out=t)
    _erf_kernel(xp, t, cdf, z, z2, q)
    cdf += 1.0
    cdf *= 0.5
    xp.multiply(x, cdf, out=value)


def _gelu_tanh_kernel(xp, x, value, tanh_u, t):
    """value = ½x(1 + tanh u) and tanh_u = tanh u, u = √(2/π)(x + 0.044715x³) = √(2/π)·x·(1 + 0.044715x²)."""
    xp.multiply(x, x, out=tanh_u)
    tanh_u *= 0.044715
    tanh_u += 1.0
    tanh_u *= x
    tanh_u *= _SQRT_2_OVER_PI
    xp.tanh(tanh_u, out=tanh_u)
    xp.multiply(x, 0.5, out=value)
    value *= xp.add(tanh_u, 1.0, out=t)


def gelu(x, approximate: str = "none", keep: bool = True):
    """(GELU(x), saved) — exact x·Φ(x), or ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
    saved is what the derivative also needs: Φ(x) (exact) or tanh u (tanh form).
    ``keep=False``: saved is None (no backward will need it; one full-size array fewer)."""
    kernel, work = (_gelu_exact_kernel, 4) if approximate == "none" else (_gelu_tanh_kernel, 1)
    if keep:
        return _chunked(kernel, x, outputs=2, work=work)
    return _chunked(kernel, x, work=work + 1)[0], None  # saved goes to the first scratch array


def _gelu_exact_slope_kernel(xp, g, x, cdf, out, t):
    """out = g·(Φ(x) + x·φ(x)), φ(x) = e^(−x²/2)/√(2π)."""
    xp.multiply(x, -0.5, out=t)
    t *= x
    xp.exp(t, out=t)
    t *= _INV_SQRT_2PI
    t *= x
    xp.add(cdf, t, out=out)
    out *= g


def _gelu_tanh_slope_kernel(xp, g, x, tanh_u, out, t):
    """out = g·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)), t = tanh u."""
    xp.multiply(x, x, out=out)
    out *= 3 * 0.044715
    out += 1.0
    out *= _SQRT_2_OVER_PI * 0.5
    out *= x
    xp.multiply(tanh_u, tanh_u, out=t)
    out *= xp.subtract(1.0, t, out=t)
    xp.add(tanh_u, 1.0, out=t)
    t *= 0.5
    out += t
    out *= g


def gelu_backward(grad, x, saved, approximate: str = "none"):
    """grad · d GELU/dx from x and the ``saved`` array that ``gelu`` returned, in the same
    chunks (the slope is scaled by grad where it is made: no full-size slope array)."""
    kernel = _gelu_exact_slope_kernel if approximate == "none" else _gelu_tanh_slope_kernel
    return _chunked(kernel, grad, x, saved, work=1)[0]
