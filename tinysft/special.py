"""Special functions the ops need that NumPy lacks: erf and the normal CDF/PDF.

erf uses Cephes' rational approximations (S. Moshier, public domain, the ones
SciPy's ``ndtr`` compiles), accurate to about 1e-16 in float64:
  |x| ≤ 1:  erf(x)  = x · T(x²) / U(x²)
  |x| > 1:  erfc(|x|) = e^(−x²) · P(|x|) / Q(|x|)   (|x| clipped to 8, where erfc < 1e-29)
It is evaluated in the input's dtype, so float32 activations stay float32.
"""
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

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _polyval(coefficients, x):
    """Horner's rule, highest power first."""
    result = x * coefficients[0]
    result += coefficients[1]
    for c in coefficients[2:]:
        result *= x
        result += c
    return result


def erf(x):
    """The error function erf(x) = 2/√π ∫₀ˣ e^(−t²) dt, elementwise on any ``xp`` array."""
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


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2))."""
    return 0.5 * (1.0 + erf(x * _SQRT1_2))


def normal_pdf(x):
    """φ(x) = e^(−x²/2) / √(2π)."""
    return _module_of(x).exp(-0.5 * x * x) * _INV_SQRT_2PI


def _module_of(x):
    from .backend import device_of, xp_for
    return xp_for(device_of(x))
