"""Doctor stage: ``python -m npu_recipes stage=doctor [device=...] [parallelism.nproc_per_node=N] [doctor.format=json]``.

Checks this machine before a long run (see :mod:`npu_recipes.diagnose` and docs/doctor.md) and
prints a table, or JSON with ``doctor.format=json``. Exit status 0 when nothing failed (warnings
allowed), 1 when a check failed; each warning or failure carries a one-line fix. It writes nothing:
no run directory.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from npu_recipes import diagnose
from npu_recipes.rundir import RunDir
from npu_recipes.schema import RecipeConfig

EXIT_CHECK_FAILED = 1
IN_LAUNCHER_ONLY = True
"""The doctor runs once, in the process the user started, whatever ``parallelism`` says: it checks the
machine for an N-process run rather than being one."""
_MARKS = {diagnose.OK: "ok", diagnose.WARN: "WARN", diagnose.FAIL: "FAIL", diagnose.SKIP: "skip"}


def prepare(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """The doctor resolves nothing and creates no run directory."""
    return None


def render_table(report: diagnose.Report) -> str:
    """The report as a fixed-width table, then one ``fix:`` line per warning or failure."""
    width = max(len(check.name) for check in report.checks)
    lines = [f"npu_recipes doctor: {report.device} ({report.reason})", ""]
    lines += [f"{check.name:<{width}}  {_MARKS[check.status]:<4}  {check.detail}" for check in report.checks]
    fixes = [check for check in report.checks if check.fix and check.status in (diagnose.WARN, diagnose.FAIL)]
    if fixes:
        lines += ["", "fixes:"] + [f"  {_MARKS[check.status]} {check.name}: {check.fix}" for check in fixes]
    failed = len(report.failed)
    lines += ["", f"{failed} check(s) failed" if failed else "all checks passed" + (" (with warnings)" if fixes else "")]
    return "\n".join(lines)


def run(config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
    """Run the checks, print them, and exit with status 1 when any failed."""
    report = diagnose.diagnose(config)
    if config.doctor.format == "json":
        print(json.dumps(report.to_dict(), indent=2), flush=True)
    else:
        print(render_table(report), flush=True)
    if report.failed:
        sys.exit(EXIT_CHECK_FAILED)
