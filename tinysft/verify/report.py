"""The results as a table a reader can follow, or as JSON for machines."""
import json
import math
import textwrap

STATUS = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}
WIDTH = 118
NAME = 30
INDENT = NAME + 1 + 6 + 1 + 9 + 1 + 9 + 2  # where the formula / method column starts


def _num(x):
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def _wrapped(prefix, text, width=WIDTH):
    lines = textwrap.wrap(text, width - INDENT, break_on_hyphens=False) or [""]
    return [prefix.ljust(INDENT) + lines[0]] + [" " * INDENT + line for line in lines[1:]]


def table(results, seed=0, dtype="float64", seconds=None) -> str:
    """One block per check: name, result, worst error, tolerance and formula; then how it was checked."""
    out = [f"tinysft verify: {len(results)} checks, seed {seed}, implementations in {dtype}, references in float64",
           "error = max|got − want| / max|want| against the independent reference; z-tests report |z|.",
           "",
           f"{'check':<{NAME}} {'result':<6} {'worst err':>9} {'tolerance':>9}  formula  /  how it was checked",
           "─" * WIDTH]
    for r in results:
        head = f"{r.name:<{NAME}} {STATUS[r.status]:<6} {_num(r.worst_error):>9} {_num(r.tolerance):>9}  "
        out += _wrapped(head, r.formula)
        out += _wrapped("", "how: " + r.method)
        if r.status == "passed" and r.worst_part:
            out += _wrapped("", f"worst: {r.worst_part}")
        if r.status == "failed":
            failing = [p for p in r.parts if not p.ok] or []
            for p in failing[:4]:
                detail = f" ({p.note})" if p.note else ""
                out += _wrapped("", f"FAILED: {p.label}: error {_num(p.error)} > {_num(p.tolerance)}{detail}")
            if not failing and r.reason:
                out += _wrapped("", f"FAILED: {r.reason}")
        if r.status == "skipped":
            out += _wrapped("", f"skipped: {r.reason}")
        for note in r.notes:
            out += _wrapped("", f"note: {note}")
        out.append("")
    counts = {s: sum(r.status == s for r in results) for s in STATUS}
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if seconds is not None:
        summary += f" in {seconds:.1f} s"
    out.append(summary)
    if counts["skipped"]:
        out.append("(a skipped check verified nothing; see its reason)")
    return "\n".join(out)


def as_json(results, seed=0, dtype="float64", seconds=None) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUS}
    return json.dumps({"seed": seed, "dtype": dtype, "seconds": None if seconds is None else round(seconds, 3),
                       "ok": counts["failed"] == 0, "summary": counts,
                       "checks": [r.to_dict() for r in results]}, indent=2, ensure_ascii=False, allow_nan=False)


def listing(checks) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    family = None
    for c in checks:
        if c.family != family:
            family = c.family
            lines.append(f"[{family}]")
        lines.append(f"  {c.name:<{width}}  {c.formula}")
    lines.append("")
    lines.append("tinysft verify --only NAME (or a family) runs some; --explain NAME shows a derivation.")
    return "\n".join(lines)


def explanation(c) -> str:
    return "\n".join([f"{c.name}  [{c.family}]", "", f"formula: {c.formula}", "", c.explanation, "",
                      f"checked: {c.method}"])
