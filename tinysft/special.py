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


def _polyval(coefficients, x):
    """Horner's rule, highest power first (a new array; ``x`` is not changed)."""
    result = x * coefficients[0]
    result += coefficients[1]
    for c in coefficients[2:]:
        result *= x
        result += c
    return result


def _chunked(fn, *arrays):
    """``fn(*arrays)`` for an elementwise ``fn`` that returns a tuple of arrays shaped like its inputs,
    computed over 64K-element chunks on the CPU (one call on a GPU), so every temporary stays in
    cache. The chunks after the first are shared out over the cores (``threads.split_rows``): these
    are single-threaded ufunc passes, about 30 per element for the exact GELU. Each element's value
    depends on that element alone, so the result is the same for any thread count."""
    from .threads import split_rows
    xp = _module_of(arrays[0])
    shape = arrays[0].shape
    # 1-D even for 0-d inputs: ufuncs give scalars for 0-d arrays, which in-place steps cannot write into
    flats = [xp.ascontiguousarray(a).reshape(-1) for a in arrays]
    if xp.__name__ != "numpy" or flats[0].size <= _CHUNK:
        return tuple(r.reshape(shape) for r in fn(*flats))
    first = fn(*(f[:_CHUNK] for f in flats))  # its dtypes size the outputs
    outs = tuple(xp.empty(flats[0].size, dtype=r.dtype) for r in first)
    for out, r in zip(outs, first):
        out[:_CHUNK] = r
    starts = range(_CHUNK, flats[0].size, _CHUNK)

    def block(begin, end):  # chunks starts[begin:end]
        for start in starts[begin:end]:
            for out, r in zip(outs, fn(*(f[start:start + _CHUNK] for f in flats))):
                out[start:start + _CHUNK] = r

    split_rows(xp, block, len(starts), _CHUNK)
    return tuple(out.reshape(shape) for out in outs)


def _erf(x):
    xp = _module_of(x)
    if x.dtype == xp.float32:
        z = xp.clip(x, -4.0, 4.0)
        z2 = z * z
        result = _polyval(_EIGEN_P, z2)
        result *= z
        result /= _polyval(_EIGEN_Q, z2)
        return result
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


def erf(x):
    """The error function erf(x) = 2/√π ∫₀ˣ e^(−t²) dt, elementwise on any ``xp`` array."""
    return _chunked(lambda v: (_erf(v),), _module_of(x).asarray(x))[0]


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2))."""
    return 0.5 * (1.0 + erf(x * _SQRT1_2))


def normal_pdf(x):
    """φ(x) = e^(−x²/2) / √(2π)."""
    return _module_of(x).exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_pair(x, approximate):
    """(GELU(x), saved): saved is what the derivative also needs, Φ(x) (exact) or tanh u (tanh form)."""
    if approximate == "none":
        saved = normal_cdf(x)
        return x * saved, saved
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x
    u *= _SQRT_2_OVER_PI
    saved = _module_of(x).tanh(u, out=u)
    value = x * 0.5
    value *= 1.0 + saved
    return value, saved


def gelu(x, approximate: str = "none", keep: bool = True):
    """(GELU(x), saved) — exact x·Φ(x), or ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
    ``keep=False``: saved is None (no backward will need it; one full-size array fewer)."""
    if keep:
        return _chunked(lambda v: _gelu_pair(v, approximate), x)
    return _chunked(lambda v: _gelu_pair(v, approximate)[:1], x)[0], None


def _gelu_slope(x, saved, approximate):
    if approximate == "none":  # Φ(x) + x·φ(x)
        return saved + x * normal_pdf(x)
    # ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)
    du = x * x
    du *= 3 * 0.044715
    du += 1.0
    du *= _SQRT_2_OVER_PI * 0.5
    du *= x
    du *= 1.0 - saved * saved
    du += 0.5 * (1.0 + saved)
    return du


def gelu_backward(grad, x, saved, approximate: str = "none"):
    """grad · d GELU/dx from x and the ``saved`` array that ``gelu`` returned, in the same
    chunks (the slope is scaled by grad where it is made: no full-size slope array)."""
    def scaled_slope(g, v, s):
        slope = _gelu_slope(v, s, approximate)
        slope *= g
        return (slope,)
    return _chunked(scaled_slope, grad, x, saved)[0]
