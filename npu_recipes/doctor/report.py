"""The doctor's report as text: a fixed-width table of checks, then one ``fix:`` line per warning or failure."""

from __future__ import annotations

from npu_recipes.doctor.checks import FAIL, OK, SKIP, WARN, Report

_MARKS = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}


def render_table(report: Report) -> str:
    """The report as the text ``stage=doctor`` prints (``doctor.format=table``)."""
    width = max(len(check.name) for check in report.checks)
    lines = [f"npu_recipes doctor: {report.device} ({report.reason})", ""]
    lines += [f"{check.name:<{width}}  {_MARKS[check.status]:<4}  {check.detail}" for check in report.checks]
    fixes = [check for check in report.checks if check.fix and check.status in (WARN, FAIL)]
    if fixes:
        lines += ["", "fixes:"] + [f"  {_MARKS[check.status]} {check.name}: {check.fix}" for check in fixes]
    failed = len(report.failed)
    lines += ["", f"{failed} check(s) failed" if failed else "all checks passed" + (" (with warnings)" if fixes else "")]
    return "\n".join(lines)
