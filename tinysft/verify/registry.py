"""The catalogue of checks, the measurements a check records, and the runner.

A check is a formula, a way of checking it, and a function

    fn(rng, dtype, impl) -> Measure        (or a bare (worst_error, tolerance) tuple)

``rng`` is a NumPy generator seeded from (seed, check name), so ``--only`` sees
the same numbers as a full run; ``dtype`` is the dtype the implementation runs
in (references are always float64); ``impl`` is the implementation under test
(the hook: tests pass a broken one to show the check fails). ``Check.impl`` is a
zero-argument loader for the real implementation, called only when the check
runs, so a module that is missing or does not build makes that one check
*skipped*, not the whole catalogue.

Errors are relative to the reference: ``max|got − want| / max|want|`` (absolute
when the reference is all zeros). A statistical test records |z| against its
critical value instead. A check passes when every part it measured is within
its tolerance; the part with the largest error/tolerance ratio is reported.
"""
import math
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# relative tolerance for "implementation == formula" at each dtype the implementation may run in
FORMULA_TOL = {"float64": 1e-10, "float32": 2e-5}
# central differences in float64 with step FD_STEP: truncation ~h², round-off ~1e-16/h
FD_STEP = 1e-6
FD_TOL = 1e-6


class Skip(Exception):
    """Raised by a check that cannot run here (a module not written yet, no compiler); the reason is shown."""


@dataclass
class Part:
    """One comparison inside a check."""
    label: str
    error: float
    tolerance: float
    note: str = ""

    def __post_init__(self):
        self.error, self.tolerance = float(self.error), float(self.tolerance)

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for nan

    @property
    def ratio(self) -> float:
        if math.isnan(self.error):
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else (math.inf if self.error > 0 else 0.0)


class Measure:
    """What a check found: a list of parts, each an error against a tolerance."""

    def __init__(self, dtype="float64"):
        self.dtype = dtype
        self.parts = []
        self.notes = []

    @property
    def tol(self) -> float:
        """The formula tolerance for this run's dtype."""
        return FORMULA_TOL[self.dtype]

    def close(self, label, got, want, tol=None):
        """Record max|got − want| / max|want| (absolute if want is all zeros); non-finite mismatches are inf.

        Infinite entries must sit at the same places with the same sign in both.
        """
        got = np.asarray(_host(got), dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        tol = self.tol if tol is None else tol
        if got.shape != want.shape:
            return self.fail(label, f"shape {got.shape}, expected {want.shape}")
        same_inf = np.isinf(want) & (got == want)
        finite = np.isfinite(want)
        if not np.all(same_inf | finite) or not np.all(np.isfinite(got[finite])):
            bad = int(np.sum(~(same_inf | (finite & np.isfinite(got)))))
            return self.fail(label, f"{bad} non-finite value(s) where the reference has others")
        diff = np.abs(got[finite] - want[finite])
        scale = np.abs(want[finite]).max() if diff.size else 0.0
        error = float(diff.max() / scale) if diff.size and scale > 0 else float(diff.max()) if diff.size else 0.0
        self.parts.append(Part(label, error, tol))
        return error

    def value(self, label, error, tol, note=""):
        """Record an error computed by the check itself (a z statistic, a gap, ...)."""
        self.parts.append(Part(label, float(error), float(tol), note))
        return error

    def require(self, label, condition, message):
        """A yes/no property; a False records an infinite error with ``message``."""
        if condition:
            self.parts.append(Part(label, 0.0, 0.0))
        else:
            self.fail(label, message)
        return bool(condition)

    def fail(self, label, message):
        self.parts.append(Part(label, math.inf, 0.0, message))
        return math.inf

    def note(self, text):
        """A remark shown with the result (e.g. which fallback was used)."""
        self.notes.append(text)

    def worst(self) -> Part | None:
        return max(self.parts, key=lambda p: p.ratio) if self.parts else None


@dataclass(frozen=True)
class Check:
    name: str
    family: str
    formula: str
    method: str
    explanation: str
    fn: Callable
    impl: Callable[[], object]


@dataclass
class Result:
    name: str
    family: str
    formula: str
    method: str
    status: str  # "passed" | "failed" | "skipped"
    worst_error: float | None = None
    tolerance: float | None = None
    worst_part: str = ""
    reason: str = ""
    notes: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    dtype: str = "float64"
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        def num(x):
            return x if x is None or math.isfinite(x) else None

        return {"name": self.name, "family": self.family, "status": self.status, "formula": self.formula,
                "method": self.method, "worst_error": num(self.worst_error), "tolerance": num(self.tolerance),
                "worst_part": self.worst_part, "reason": self.reason, "notes": list(self.notes),
                "dtype": self.dtype, "seconds": round(self.seconds, 4),
                "parts": [{"label": p.label, "error": num(p.error), "tolerance": num(p.tolerance),
                           "passed": p.ok, **({"note": p.note} if p.note else {})} for p in self.parts]}


CHECKS: dict = {}


def check(name, family, formula, method, explanation, impl):
    """Decorator: register ``fn(rng, dtype, impl) -> Measure`` as a check."""
    def register(fn):
        if name in CHECKS:
            raise ValueError(f"check {name!r} registered twice")
        CHECKS[name] = Check(name, family, formula, method, _dedent(explanation), fn, impl)
        return fn
    return register


def _dedent(text):
    import textwrap
    return textwrap.dedent(text).strip("\n")


def _host(x):
    """NumPy array of a Tensor, a CuPy array or anything array-like."""
    if hasattr(x, "numpy") and callable(x.numpy):
        return x.numpy()
    if hasattr(x, "get") and callable(x.get) and type(x).__module__.startswith("cupy"):
        return x.get()
    return x


# one module per family; the catalogue lists the checks in this order
FAMILIES = ("losses", "optimizers", "regularization", "dropout", "clipping", "stability", "decoder", "kernels",
            "finetuning", "lora", "sft")


def _load_catalogue():
    import importlib
    for family in FAMILIES:
        importlib.import_module(f"{__package__}.{family}")
    return CHECKS


def catalogue() -> dict:
    """Every registered check, by name, in catalogue order."""
    return _load_catalogue()


def select(only=None) -> list:
    """The checks named in ``only`` (names or family names); all when ``only`` is empty."""
    checks = catalogue()
    if not only:
        return list(checks.values())
    chosen, unknown = [], []
    for key in only:
        matches = [c for c in checks.values() if c.name == key or c.family == key]
        if not matches:
            unknown.append(key)
        chosen.extend(c for c in matches if c not in chosen)
    if unknown:
        names = ", ".join(checks)
        raise LookupError(f"no check or family named {', '.join(map(repr, unknown))}; the checks are: {names}")
    return chosen


def rng_for(seed: int, name: str) -> np.random.Generator:
    """The generator of one check: depends on the seed and the check's name only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def run_check(chk: Check, seed=0, dtype="float64", impl=None) -> Result:
    """Run one check; ``impl`` replaces the real implementation (the test hook)."""
    if dtype not in FORMULA_TOL:
        raise ValueError(f"dtype must be one of {tuple(FORMULA_TOL)}, got {dtype!r}")
    result = Result(chk.name, chk.family, chk.formula, chk.method, "failed", dtype=dtype)
    start = time.perf_counter()
    try:
        if impl is None:
            try:
                impl = chk.impl()
            except ImportError as error:
                raise Skip(f"implementation not importable ({error})") from error
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measure = chk.fn(rng_for(seed, chk.name), dtype, impl)
        if isinstance(measure, tuple):  # a bare (worst_error, tolerance)
            error, tolerance = measure
            measure = Measure(dtype)
            measure.value(chk.name, error, tolerance)
        for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            measure.note(f"warning raised while checking: {text}")
    except Skip as skip:
        result.status, result.reason = "skipped", str(skip)
    except Exception as error:  # noqa: BLE001  (a crash in the implementation is a failure, reported as such)
        result.reason = f"raised {type(error).__name__}: {error}"
    else:
        result.parts, result.notes = measure.parts, measure.notes
        result.dtype = measure.dtype
        worst = measure.worst()
        if worst is None:
            result.reason = "the check measured nothing"
        else:
            result.worst_error, result.tolerance, result.worst_part = worst.error, worst.tolerance, worst.label
            result.reason = worst.note
            result.status = "passed" if all(p.ok for p in measure.parts) else "failed"
    result.seconds = time.perf_counter() - start
    return result


def run_checks(only=None, seed=0, dtype="float64", impls=None) -> list:
    """Run the catalogue (or the checks in ``only``); ``impls`` maps a check name to a replacement implementation."""
    impls = impls or {}
    return [run_check(c, seed, dtype, impls.get(c.name)) for c in select(only)]
