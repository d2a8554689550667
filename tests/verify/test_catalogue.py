"""The catalogue runs, passes, and reports what it did (table, JSON, --list, --explain)."""
import json
import re

import numpy as np
import pytest

from tinysft import verify
from tinysft.verify import Skip, catalogue, report, run_check, run_checks
from tinysft.verify.registry import Measure

FAMILIES = {"losses", "optimizers", "regularization", "dropout", "clipping", "stability", "decoder", "kernels",
            "finetuning", "lora", "sft"}
REQUIRED = {"cross_entropy", "cross_entropy_smoothing_ignore", "mse", "sgd", "sgd_momentum", "sgd_nesterov", "adam",
            "adamw", "layerwise_lr_decay", "l1_penalty", "l2_penalty", "l2sp_penalty", "decay_sgd_coincide",
            "decay_adam_differ", "dropout_mean", "dropout_variance", "clip_grad_norm", "clip_grad_value",
            "softmax_stability", "layer_norm", "gelu", "kernel_cross_entropy", "kernel_clip_grad_norm",
            "fisher_scaling", "distillation", "lora_merge", "lora_gradients", "sft_masked_loss", "sft_accumulation",
            "sft_packing", "sft_linear_cross_entropy"}


@pytest.fixture(scope="module", params=["float64", "float32"])
def results(request):
    return request.param, run_checks(dtype=request.param)


def test_catalogue_covers_the_issue():
    checks = catalogue()
    assert REQUIRED <= set(checks)
    assert {c.family for c in checks.values()} == FAMILIES
    for c in checks.values():
        assert c.formula and c.method and len(c.explanation.splitlines()) >= 2, c.name


def test_everything_passes_or_is_skipped_with_a_reason(results):
    dtype, res = results
    assert [r.name for r in res] == list(catalogue())
    for r in res:
        assert r.status in ("passed", "skipped"), (dtype, r.to_dict())
        if r.status == "skipped":
            assert r.reason and r.family == "kernels", r.to_dict()
        else:
            assert r.worst_error <= r.tolerance and r.parts


def test_only_cpu_independent_checks_may_skip(results):
    """Kernels skip only when the emulator cannot build; here (g++ present) they must run."""
    import shutil
    _, res = results
    if shutil.which("g++"):
        assert all(r.status == "passed" for r in res if r.family == "kernels"), \
            [r.reason for r in res if r.family == "kernels"]


def test_same_seed_same_numbers_and_only_matches_full_run(results):
    dtype, res = results
    again = run_checks(only=["adam", "dropout_mean", "layerwise_lr_decay"], dtype=dtype)
    full = {r.name: r for r in res}
    for r in again:
        assert r.worst_error == full[r.name].worst_error


def test_only_accepts_families_and_rejects_unknown_names():
    assert {r.family for r in run_checks(only=["clipping"])} == {"clipping"}
    with pytest.raises(LookupError, match="no check or family named 'nope'"):
        run_checks(only=["nope"])


def test_skipped_is_not_passed(monkeypatch):
    from dataclasses import replace

    def missing():
        raise ImportError("No module named 'tinysft.cuda'")

    def unbuildable():
        raise Skip("the CUDA emulator could not build the kernels: g++ failed")

    for loader, reason in ((missing, "not importable"), (unbuildable, "could not build")):
        monkeypatch.setitem(verify.CHECKS, "kernel_cross_entropy",
                            replace(catalogue()["kernel_cross_entropy"], impl=loader))
        r = run_check(catalogue()["kernel_cross_entropy"])
        assert r.status == "skipped" and reason in r.reason and not r.passed
        text = report.table([r])
        assert "SKIP" in text and "PASS" not in text and "skipped: " in text and "1 skipped" in text
        assert json.loads(report.as_json([r]))["checks"][0]["status"] == "skipped"


def test_a_crash_is_a_failure_with_its_message():
    def crashing(*args, **kwargs):
        raise ZeroDivisionError("oops")

    r = run_check(catalogue()["mse"], impl=crashing)
    assert r.status == "failed" and "ZeroDivisionError: oops" in r.reason
    assert "FAILED: raised ZeroDivisionError: oops" in report.table([r])


def test_measure_errors_are_relative_and_catch_non_finite():
    m = Measure("float64")
    assert m.close("a", [1.0, 2.0 + 2e-6], [1.0, 2.0]) == pytest.approx(1e-6)
    assert m.close("zeros", [0.0, 0.0], [0.0, 0.0]) == 0.0
    assert m.close("nan", [np.nan, 1.0], [0.0, 1.0]) == float("inf")
    assert m.close("same -inf", [-np.inf, 1.0], [-np.inf, 1.0]) == 0.0
    assert m.close("shape", [1.0], [1.0, 2.0]) == float("inf")
    assert [p.ok for p in m.parts] == [False, True, False, True, False]


def test_table_lists_every_check_with_its_columns(results):
    dtype, res = results
    text = report.table(res, dtype=dtype, seconds=1.0)
    for r in res:
        line = next(line for line in text.splitlines() if line.startswith(r.name + " "))
        assert re.search(r"(PASS|SKIP)\s+(\d\.\d+e[+-]\d+|—)\s+(\d\.\d+e[+-]\d+|—)", line), line
    assert "how: " in text and f"{len(res)} checks" in text
    assert text.splitlines()[-1].startswith(f"{sum(r.passed for r in res)} passed, 0 failed")


def test_json_is_strict_and_complete(results):
    dtype, res = results
    data = json.loads(report.as_json(res, dtype=dtype))  # allow_nan=False: strict JSON
    assert data["ok"] is True and data["dtype"] == dtype
    assert [c["name"] for c in data["checks"]] == list(catalogue())
    for c in data["checks"]:
        assert {"formula", "method", "status", "worst_error", "tolerance", "parts"} <= set(c)


def test_failed_check_with_infinite_error_is_still_valid_json():
    from .mutants import unstable_functional
    r = run_check(catalogue()["softmax_stability"], impl=unstable_functional())
    data = json.loads(report.as_json([r]))
    assert data["ok"] is False and data["checks"][0]["status"] == "failed"


def test_main_list_and_explain(capsys):
    assert verify.main(list_checks=True) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in catalogue())
    assert verify.main(explain="distillation") == 0
    text = capsys.readouterr().out
    assert "T·(p_s − p_t)/N" in text and "formula:" in text and "checked:" in text
    assert verify.main(explain="nope") == 2
    assert "no check named 'nope'" in capsys.readouterr().err
    assert verify.main(only=["nope"]) == 2


def test_main_returns_1_when_a_check_fails(monkeypatch, capsys):
    from dataclasses import replace

    from .mutants import AdamNoBiasCorrection
    monkeypatch.setitem(verify.CHECKS, "adam", replace(catalogue()["adam"], impl=lambda: AdamNoBiasCorrection))
    assert verify.main(only=["adam", "sgd"]) == 1
    out = capsys.readouterr().out
    assert "adam" in out and "FAIL" in out and "1 passed, 1 failed" in out


def test_every_explanation_is_printable():
    for name, c in catalogue().items():
        text = report.explanation(c)
        assert name in text and c.formula in text


def test_layerwise_falls_back_and_says_so_without_tinysft_models(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tinysft.models", None)  # `import tinysft.models` now raises ImportError
    monkeypatch.setitem(sys.modules, "tinysft.models.bert", None)
    r = run_check(catalogue()["layerwise_lr_decay"])
    assert r.status == "passed", r.to_dict()
    assert any(note.startswith("fallback: tinysft.models not importable") for note in r.notes)


def test_a_check_may_return_a_bare_error_and_tolerance(monkeypatch):
    from tinysft.verify.registry import Check

    def fn(rng, dtype, impl):
        return abs(impl(2.0) - 4.0), 1e-12

    c = Check("square", "demo", "x² at 2 is 4", "direct", "trivial", fn, lambda: (lambda x: x * x))
    assert run_check(c).status == "passed"
    assert run_check(c, impl=lambda x: 2 * x + 0.5).status == "failed"
